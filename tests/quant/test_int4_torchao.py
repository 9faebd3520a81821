"""The torchao side of the INT4 comparison (fewstep.bench.int4): torchao's int4 weight-only numerics rebuilt
from its quantization primitives are 4-bit asymmetric min-max groups.  Skipped without torchao
(``pip install fewstep[torchao]``)."""

import pytest
import torch

pytest.importorskip("torchao")

from fewstep.bench.int4 import _torchao_int4_weight  # noqa: E402


@pytest.mark.parametrize("group_size", [32, 128])
def test_torchao_tinygemm_weight_is_a_4bit_min_max_grid(group_size):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 256, generator=g) * 0.02 + 0.01).to(torch.bfloat16)
    deq = _torchao_int4_weight(w, group_size, hqq=False)
    assert deq.dtype == torch.bfloat16 and deq.shape == w.shape and bool(deq.isfinite().all())
    wg = w.double().reshape(48, -1, group_size)
    dg = deq.double().reshape(48, -1, group_size)
    step = (wg.amax(-1) - wg.amin(-1)) / 15  # float64 oracle of the asymmetric grid
    # at most 16 levels per group, every weight within half a step, plus the bf16 rounding of the scale, of
    # the float zero point (min + 8 steps: up to 2^-9 of the group's largest weight) and of the result
    assert max(len(torch.unique(d)) for d in dg.reshape(-1, group_size)) <= 16
    err = (dg - wg).abs()
    assert bool((err <= 0.5 * step[..., None] * 1.03 + 2**-6 * wg.abs().amax(-1, keepdim=True)).all())
    # uniform rounding noise: mean squared error ~ step^2 / 12 (an 8-bit grid would be 250x smaller)
    ratio = (err.pow(2).mean(-1) / (step.pow(2) / 12)).mean()
    assert 0.7 < float(ratio) < 1.3


def test_torchao_hqq_weight_has_16_levels_per_group():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(32, 256, generator=g) * 0.02).to(torch.bfloat16)
    deq = _torchao_int4_weight(w, 64, hqq=True)
    assert deq.shape == w.shape and bool(deq.isfinite().all())
    assert max(len(torch.unique(d)) for d in deq.reshape(-1, 64)) <= 16
    err = (deq.double() - w.double()).pow(2).mean() / w.double().pow(2).mean()
    assert 10 * torch.log10(1 / err) > 15.0  # 4-bit: ~20 dB on Gaussian weights
