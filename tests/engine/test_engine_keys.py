"""fs.Engine's plan cache: every part of the key (here the conditioning dtype) selects its own plan."""

import torch

import fewstep as fs

from ..kernels.programs import VP

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (3, 2, 5, 7)


def _labelled_net(x, t, class_labels):
    """A network whose output depends on the labels (integer of either width)."""
    y = class_labels.to(x.dtype).view(-1, 1, 1, 1)
    return torch.tanh(x) * (1 + 0.1 * y) + 0.01 * t.view(-1, 1, 1, 1) / 1000


def test_label_dtypes_build_their_own_plans():
    """int64 labels, then int32 labels of the same shape: two plans, each output equal to a plan compiled
    directly for that dtype; a repeat of the first dtype reuses its plan."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)).to(DEV)
    y64 = torch.tensor([1, 5, 2], dtype=torch.int64, device=DEV)
    y32 = torch.tensor([7, 0, 3], dtype=torch.int32, device=DEV)
    eng = fs.Engine(_labelled_net, VP, solver="euler", nfe=3)
    a = eng(noise, class_labels=y64)
    b = eng(noise, class_labels=y32)
    assert len(eng.plans) == 2
    assert [p._cond["class_labels"].dtype for p in eng.plans] == [torch.int64, torch.int32]
    for y, out in ((y64, a), (y32, b)):
        direct = fs.compile(_labelled_net, VP, solver="euler", nfe=3, shape=SHAPE, device=DEV,
                            cond={"class_labels": y})
        assert torch.equal(out, direct(noise, class_labels=y)), y.dtype
    first = eng.plans[0]
    assert torch.equal(eng(noise, class_labels=y64), a)
    assert len(eng.plans) == 2 and eng.plans[-1] is first  # reused, now the most recently used
