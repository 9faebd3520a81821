"""PlanConfig.kernels: how "auto" resolves, explicit backends that cannot run, plan files, the native op
inside torch.compile, and the native CPU op against the PyTorch references in whole plans."""

import warnings

import pytest
import torch

import fewstep as fs
import fewstep.engine.plan as plan_module
from fewstep.engine import Plan
from fewstep.kernels import native

from ..kernels.programs import VP, get_program, guided_toy_net, program_ids, toy_net
from .test_plan import SHAPE, as_plan_model
from .test_plan_file import _read

needs_cpp = pytest.mark.skipif(not native.available("cpu"), reason=f"no native op: {native.load_error()}")
DEV = "cpu"  # the backends compared here are the CPU ones (tests/engine/test_plan_cuda.py covers CUDA)


def _noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def _unavailable(monkeypatch, why="simulated: fewstep._C not built"):
    monkeypatch.setattr(native, "available", lambda device=None: False)
    monkeypatch.setattr(native, "load_error", lambda: why)


def _cpu_plan(name="unipc", guidance=None, **kw):
    net = guided_toy_net if guidance is not None else toy_net
    return Plan(as_plan_model(net), get_program(name, guidance), shape=SHAPE, device=DEV, **kw)


def test_auto_on_cpu_is_cpp_with_the_extension_and_torch_without(monkeypatch):
    calls = []
    real = native.solver_update_native

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(native, "solver_update_native", spy)
    plan = _cpu_plan()
    want = "cpp" if native.available("cpu") else "torch"
    assert plan.kernels == want and f"kernels={want} " in plan.describe()
    calls.clear()
    plan(_noise(), seed=1)
    # one op call a stage when the native backend runs, none otherwise
    assert len(calls) == (len(plan.program.stages) if want == "cpp" else 0)
    _unavailable(monkeypatch)
    assert _cpu_plan().kernels == "torch"


def test_explicit_backend_that_cannot_run_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="kernels='cuda'.*cuda tensors.*this plan is on cpu"):
        _cpu_plan(kernels="cuda")
    _unavailable(monkeypatch)
    with pytest.raises(ValueError, match="kernels='cpp'.*simulated: fewstep._C not built"):
        _cpu_plan(kernels="cpp")


def test_auto_on_cuda_takes_the_faster_backend_by_its_measured_times(monkeypatch):
    """The choice rule on CUDA, with the two backends' times and availability stubbed (no GPU needed)."""
    prog = get_program("unipc", 2.0)
    upds = [fs.kernels.solver_update.StageUpdate.from_stage(st, prog.registers, True) for st in prog.stages]
    cuda = torch.device("cuda", 0)
    kw = dict(device=cuda, updates=upds, n_regs=len(prog.registers), n=10, g=2, dtype=torch.float16,
              kernel_config=None)
    monkeypatch.setattr(plan_module, "_has_triton", lambda: True)
    monkeypatch.setattr(native, "available", lambda device=None: True)
    for times, want in (({"triton": 2.0, "cuda": 1.0}, "cuda"), ({"triton": 1.0, "cuda": 3.0}, "triton")):
        monkeypatch.setattr(plan_module, "_time_cuda_backends", lambda *a, t=times, **k: t)
        assert plan_module._resolve_kernels("auto", **kw) == (want, times)
    monkeypatch.setattr(native, "CUDA_MAX_ROWS", 1)  # a stage over the native kernel's limits
    assert plan_module._resolve_kernels("auto", **kw) == ("triton", None)
    with pytest.raises(ValueError, match="kernels='cuda'.*outputs"):
        plan_module._resolve_kernels("cuda", **kw)
    monkeypatch.setattr(native, "available", lambda device=None: False)
    assert plan_module._resolve_kernels("auto", **kw) == ("triton", None)


@needs_cpp
def test_plan_file_records_the_backend_and_falls_back_where_it_cannot_run(tmp_path, monkeypatch):
    model = as_plan_model(guided_toy_net)
    plan = fs.compile(model, VP, solver="dpmpp_2m", nfe=3, shape=SHAPE, device=DEV,
                      guidance_scale=2.0)
    assert plan.kernels == "cpp"
    plan.save(tmp_path / "p.plan")
    assert _read(tmp_path / "p.plan")[0]["config"]["kernels"] == "cpp"
    noise = _noise()
    want = plan(noise)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fs.load(tmp_path / "p.plan", model, device=DEV)
    assert again.kernels == "cpp" and torch.equal(again(noise), want)
    _unavailable(monkeypatch)
    with pytest.warns(RuntimeWarning, match="kernels='cpp'.*simulated.*re-resolving kernels='auto'") as rec:
        fallback = fs.load(tmp_path / "p.plan", model, device=DEV)
    assert len(rec) == 1 and fallback.kernels == "torch"
    assert torch.equal(fallback(noise), want)  # deterministic solver: the backends agree bit for bit
    with pytest.raises(ValueError, match="simulated"):  # asked for by the user, not read from a file
        fs.compile(model, VP, solver="dpmpp_2m", nfe=3, shape=SHAPE, device=DEV, guidance_scale=2.0,
                   kernels="cpp")


class _TinyNet(torch.nn.Module):
    """A network torch.compile traces whole (its time input stays a tensor)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=0.2, generator=torch.Generator().manual_seed(3))

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (1.0 + t.view(-1, 1, 1, 1) / 1000)


@needs_cpp
@pytest.mark.parametrize("name", ["unipc", "dpmpp_2m_sde"])
def test_the_plan_loop_compiles_as_one_graph_through_the_native_op(name):
    if name not in program_ids():
        pytest.skip(f"{name} not registered")
    torch._dynamo.reset()
    with torch.no_grad():
        plan = Plan(_TinyNet(), get_program(name, 1.5), shape=SHAPE, device=DEV, kernels="cpp")
        noise = _noise()
        eager = plan(noise, seed=7)
        # fullgraph=True: any graph break (an op torch.compile cannot trace) is an error
        plan._run_loop = torch.compile(plan._run_loop, fullgraph=True, backend="aot_eager")
        compiled = plan(noise, seed=7)
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


@needs_cpp
@pytest.mark.parametrize("guidance", [None, 2.0])
@pytest.mark.parametrize("name", program_ids())
def test_cpp_plans_equal_torch_plans_for_deterministic_solvers(name, guidance):
    prog = get_program(name, guidance)
    if prog.stochastic:
        pytest.skip("stochastic: the native op draws Triton's Philox noise, the references ref_noise")
    net = as_plan_model(guided_toy_net if guidance is not None else toy_net)
    noise = _noise()
    outs = {k: Plan(net, prog, shape=SHAPE, device=DEV, kernels=k)(noise) for k in ("cpp", "torch")}
    assert torch.equal(outs["cpp"], outs["torch"])
