"""Shared pieces of the export tests: the bundled digits model, plans built the way the tests compare them
(CPU, no CUDA graph, the plan's own kernels), and the relative error."""

import pytest
import torch

import fewstep as fs

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

DIGITS_SHAPE = (2, 1, 8, 8)
LABELS = torch.tensor([3, 7])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of ``a`` from the reference ``b`` (NaN never passes)."""
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/Inf in a sample"
    return float((a.double() - b.double()).norm() / b.double().norm())


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def digits():
    """``(model, spec)``: the bundled digits DiT through its diffusers adapter (as `fewstep sample`)."""
    from fewstep.models import digits as d

    dit, _ = d.load_digits_dit()
    return fs.models.from_diffusers(dit, d.digits_scheduler_config())


def digits_plan(digits, solver, nfe=3, guidance=1.5, shape=DIGITS_SHAPE, **kw):
    model, spec = digits
    labels = LABELS[: shape[0]] if shape[0] <= len(LABELS) else torch.arange(shape[0]) % 10
    return fs.compile(model, spec, solver=solver, nfe=nfe, shape=shape, guidance_scale=guidance, device="cpu",
                      cond={"class_labels": labels}, cuda_graph=False, **kw), {"class_labels": labels}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test process: the suite runs on 2 cores with one test per core (pytest -n 2),
    where a second OpenMP thread only spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
