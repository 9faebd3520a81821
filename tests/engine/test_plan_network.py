"""A plan's default dtype and device come from the network, also behind an adapter; compile_network plans
keep Dynamo's recompile limit above their number."""

import warnings

import pytest
import torch
from torch import nn

import fewstep as fs
from fewstep.engine import Plan
from fewstep.engine import plan as plan_module

from ..kernels.programs import get_program, program_ids


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        return self.scale * x


class _Adapter:  # a callable that is not a module and holds its network, as fs.models' adapters do
    def __init__(self, model):
        self.model = model
        self.seen = []

    def __call__(self, x, t):
        self.seen.append(x.dtype)
        return self.model(x, t)


def test_adapter_plan_uses_its_networks_dtype():
    adapter = _Adapter(_Net().to(torch.float64))
    plan = Plan(adapter, get_program(program_ids()[0], None), shape=(2, 3, 4, 4))
    assert plan.dtype == torch.float64  # not the float32 default of a plain callable
    assert set(adapter.seen) == {torch.float64}
    wrapped = _Adapter(_Net().to(torch.bfloat16))

    def outer(x, t):
        return wrapped(x, t)

    outer.__wrapped__ = wrapped  # a wrapper (functools.wraps, Calibrator.wrap) around the adapter
    assert Plan(outer, get_program(program_ids()[0], None), shape=(1, 2, 4, 4)).dtype == torch.bfloat16


def test_diffusers_adapter_dtype():
    diffusers = pytest.importorskip("diffusers")  # noqa: F841
    from ..quant.test_quantize import tiny_dit

    fn, spec = fs.models.from_diffusers(tiny_dit().to(torch.bfloat16))
    plan = fs.compile(fn, spec, solver="euler", nfe=2, shape=(2, 4, 8, 8), device="cpu",
                      cond={"class_labels": torch.tensor([1, 2])})
    assert plan.dtype == torch.bfloat16


def test_recompile_limit_grows_with_compiled_plans(monkeypatch):
    import torch._dynamo.config as dc

    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(dc, name, 2)
    monkeypatch.setattr(plan_module, "_COMPILED_PLANS", [0])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            plan_module._size_recompile_limit()
        assert not seen and getattr(dc, name) == 2
        plan_module._size_recompile_limit()
    assert getattr(dc, name) == 3
    assert len(seen) == 1 and "raised it to 3" in str(seen[0].message)
