"""Plans (eager on CPU, one CUDA graph on GPU) against run_reference with the same network."""

import warnings

import pytest
import torch

import fewstep as fs
from fewstep.engine import Plan

from ..kernels.programs import VP, get_program, guided_toy_net, local_ancestral, program_ids, toy_net

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (3, 2, 5, 7)


def as_plan_model(fn, log=None):
    """``fn(x, t_float)`` as a plan network ``model(x, t_tensor)``; checks the time input it gets."""

    def model(x, t):
        assert isinstance(t, torch.Tensor) and t.shape == (x.shape[0],) and t.device == x.device
        if log is not None:
            log.append(float(t[0]))
        return fn(x.double(), float(t[0])).to(x.dtype)

    return model


def _rel(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/Inf in a sample"
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def _noise(shape=SHAPE, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("name", program_ids())
def test_plan_matches_run_reference(name, guidance):
    prog = get_program(name, guidance)
    net = guided_toy_net if guidance is not None else toy_net
    seen = []
    plan = Plan(as_plan_model(net, seen), prog, shape=SHAPE, device=DEV, record_noise=True)
    seen.clear()
    noise = _noise()
    out = plan(noise, seed=5)
    assert len(seen) == plan.nfe == prog.nfe
    assert seen == pytest.approx(list(plan.timesteps), rel=1e-6)
    ref = fs.solvers.run_reference(prog, net, noise.double().cpu(), step_noise=plan.recorded_noise())
    assert out.dtype == torch.float32 and out.shape == SHAPE
    # measured <= 6.8e-7 (float32 state; guided dpmpp_2m_sde, where float32 run_reference measures 6.7e-7);
    # 4x margin
    assert _rel(out, ref) <= 3e-6


@pytest.mark.parametrize("guidance", [None, 2.0])
@pytest.mark.parametrize("name", ["local_ab2", "local_ancestral", "unipc", "dpmpp_2m_sde"])
def test_plan_with_triton_kernels(name, guidance):
    """The same plan through the fused kernel (interpreted on CPU)."""
    if name not in program_ids():
        pytest.skip(f"{name} not registered")
    prog = get_program(name, guidance)
    net = guided_toy_net if guidance is not None else toy_net
    plan = Plan(as_plan_model(net), prog, shape=(1, 3, 2, 3), device=DEV, kernels="triton", record_noise=True)
    noise = _noise((1, 3, 2, 3))
    out = plan(noise, seed=11)
    ref = fs.solvers.run_reference(prog, net, noise.double().cpu(), step_noise=plan.recorded_noise())
    assert _rel(out, ref) <= 3e-6  # measured <= 5.1e-7 (float32 state, guided local_ab2); 6x margin


def test_plan_noise_stages_independent_with_triton_kernels():
    """Within one plan call every noisy stage draws its own Philox stream: no stage's recorded noise is
    another stage's (or its own) shifted by a few elements.  Plan tests that replay the recorded noise into
    the reference cannot see this."""
    pytest.importorskip("triton")
    from ..kernels.noise_stats import check_streams_independent, corr_bound

    shape = (1, 3, 19, 23)  # 1311 elements: not a multiple of the launch block
    prog = local_ancestral(VP, 6)  # 5 noisy stages
    plan = Plan(as_plan_model(toy_net), prog, shape=shape, device=DEV, kernels="triton", record_noise=True)
    plan(_noise(shape), seed=31)
    zs = [z.cpu() for z in plan.recorded_noise()]
    assert len(zs) == 5
    check_streams_independent(zs, corr_bound(zs[0].numel()))


def test_stochastic_seed_reproducible():
    prog = get_program("local_ancestral")
    plan = Plan(as_plan_model(toy_net), prog, shape=SHAPE, device=DEV)
    noise = _noise()
    a, b, c = plan(noise, seed=1), plan(noise, seed=1), plan(noise, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(plan(noise, generator=g1), plan(noise, generator=g2))
    assert not torch.equal(plan(noise), plan(noise))  # fresh seed per call by default
    with pytest.raises(ValueError, match="seed"):
        plan(noise, seed=-1)


def _bf16_net(x, t):
    return toy_net(x.to(torch.bfloat16).double(), t).to(torch.bfloat16)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "unipc", "local_ab2"])
def test_bf16_within_bf16_rounding(name):
    """bf16 network input: error vs the float64 loop at most 2x that of the same loop run wholly in bf16."""
    if name not in program_ids():
        pytest.skip(f"{name} not registered")
    prog = get_program(name)
    plan = Plan(as_plan_model(_bf16_net), prog, shape=SHAPE, device=DEV, dtype=torch.bfloat16)
    noise = _noise().to(torch.bfloat16).float()
    out = plan(noise)
    exact = fs.solvers.run_reference(prog, toy_net, noise.double().cpu())
    naive = fs.solvers.run_reference(prog, lambda x, t: toy_net(x, t).to(torch.bfloat16), noise.cpu(),
                                     dtype=torch.bfloat16)
    assert _rel(out, exact) <= 2 * _rel(naive, exact)
    assert _rel(out, exact) <= 0.05


def test_bad_inputs_say_expected_and_received():
    plan = Plan(as_plan_model(toy_net), get_program("euler"), shape=SHAPE, device=DEV)
    with pytest.raises(ValueError, match=r"noise shape: expected \(3, 2, 5, 7\), got \(2, 2, 5, 7\)"):
        plan(_noise((2, 2, 5, 7)))
    with pytest.raises(ValueError, match="noise dtype: expected torch.float32 or torch.float32, got"):
        plan(torch.zeros(SHAPE, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="noise device: expected"):
        plan(torch.zeros(SHAPE, device="meta"))
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['class_labels'\]"):
        plan(_noise(), class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        plan(noise=[0.0])


def _cond_net(x, t, class_labels):
    y, s = class_labels.to(x.dtype).view(-1, 1, 1, 1), t.view(-1, 1, 1, 1) / 1000
    return torch.tanh(x) * (1 + 0.1 * y) * s


def test_conditioning_buffers():
    prog = fs.solvers.build("euler", VP, 3)
    labels = torch.tensor([1, 2, 3], device=DEV)
    plan = fs.compile(_cond_net, VP, solver="euler", nfe=3, shape=SHAPE, device=DEV,
                      cond={"class_labels": labels})
    noise = _noise()
    other = torch.tensor([4, 0, 7], device=DEV)
    for y in (labels, other):
        out = plan(noise, class_labels=y)
        def ref_net(x, t, y=y):
            return _cond_net(x, torch.full((3,), t, dtype=x.dtype), y.cpu())

        ref = fs.solvers.run_reference(prog, ref_net, noise.double().cpu())
        assert _rel(out, ref) <= 1e-6  # measured 2.1e-7 (float32 state, 3 euler steps); 5x margin
    with pytest.raises(ValueError, match=r"cond\['class_labels'\] shape: expected \(3,\), got \(2,\)"):
        plan(noise, class_labels=labels[:2])
    with pytest.raises(ValueError, match=r"dtype: expected torch.int64, got torch.int32"):
        plan(noise, class_labels=labels.int())
    with pytest.raises(ValueError, match=r"missing \['class_labels'\]"):
        plan(noise)


def test_model_output_checked_at_build():
    with pytest.raises(ValueError, match=r"model output: expected shape \(3, 2, 5, 7\).*got \(3, 4, 5, 7\)"):
        fs.compile(lambda x, t: torch.cat([x, x], 1), VP, solver="euler", nfe=2, shape=SHAPE, device=DEV)
    with pytest.raises(TypeError, match="must return a tensor"):
        fs.compile(lambda x, t: (x,), VP, solver="euler", nfe=2, shape=SHAPE, device=DEV)
    # guidance doubles the network's batch
    with pytest.raises(ValueError, match=r"model output: expected shape \(6, 2, 5, 7\)"):
        fs.compile(lambda x, t: x[: x.shape[0] // 2], VP, solver="euler", nfe=2, shape=SHAPE, device=DEV,
                   guidance_scale=2.0)


def test_check_finite():
    def sometimes_nan(x, t):
        return torch.where(x > 500, torch.full_like(x, float("nan")), torch.tanh(x))

    plan = fs.compile(sometimes_nan, VP, solver="euler", nfe=2, shape=SHAPE, device=DEV, check_finite=True)
    good = _noise()
    assert torch.isfinite(plan(good)).all()
    with pytest.raises(FloatingPointError, match="non-finite"):
        plan(torch.full(SHAPE, 100.0, device=DEV))
    assert torch.isfinite(plan(good)).all()  # the plan still works after the error


def test_engine_caches_plans_per_shape():
    built = []

    def net(x, t):
        if x.shape[0] == 7:
            raise RuntimeError("this network cannot run batch 7")
        built.append(tuple(x.shape))
        return torch.tanh(x)

    eng = fs.Engine(net, VP, solver="euler", nfe=2, max_plans=2)  # shape and device come from the noise
    a = eng(_noise((1, 2, 3, 3)))
    eng(_noise((2, 2, 3, 3)))
    p1 = eng.plan_for(_noise((1, 2, 3, 3)))
    assert len(eng.plans) == 2 and eng.plans[-1] is p1
    eng(_noise((3, 2, 3, 3)))  # evicts (2, ...), the least recently used
    assert [p.shape[0] for p in eng.plans] == [1, 3]
    with pytest.raises(RuntimeError, match="batch 7"):
        eng(_noise((7, 2, 3, 3)))
    assert [p.shape[0] for p in eng.plans] == [1, 3]  # nothing half-built is cached
    assert torch.equal(eng(_noise((1, 2, 3, 3))), a)
    direct = fs.compile(net, VP, solver="euler", nfe=2, shape=(1, 2, 3, 3), device=DEV)
    assert torch.equal(direct(_noise((1, 2, 3, 3))), a)


def test_engine_rejects_per_call_options():
    with pytest.raises(ValueError, match="from each call"):
        fs.Engine(toy_net, VP, solver="euler", nfe=2, shape=(1, 2))
    with pytest.raises(ValueError, match="max_plans"):
        fs.Engine(toy_net, VP, solver="euler", nfe=2, max_plans=0)


def test_compile_errors_are_clear():
    with pytest.raises(ValueError, match="unknown solver"):
        fs.compile(toy_net, VP, solver="nope", nfe=2, shape=SHAPE, device=DEV)
    with pytest.raises(ValueError, match="shape"):
        fs.compile(toy_net, VP, solver="euler", nfe=2, shape=(0, 3), device=DEV)
    with pytest.raises(ValueError, match="dtype"):
        fs.compile(toy_net, VP, solver="euler", nfe=2, shape=SHAPE, device=DEV, dtype=torch.int32)
    with pytest.raises(ValueError, match="kernels"):
        fs.compile(toy_net, VP, solver="euler", nfe=2, shape=SHAPE, device=DEV, kernels="cuda")
    with pytest.raises(ValueError, match="compile_network"):
        fs.compile(toy_net, VP, solver="euler", nfe=2, shape=SHAPE, device=DEV,
                   compile_network="reduce-overhead")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU fallback behaviour")
def test_compile_network_on_cpu_warns_and_runs_eager():
    with pytest.warns(UserWarning, match="CUDA-only"):
        plan = fs.compile(as_plan_model(toy_net), VP, solver="euler", nfe=2, shape=SHAPE,
                          compile_network=True)
    assert not plan.cuda_graph
    ref = fs.solvers.run_reference(plan.program, toy_net, _noise().double())
    assert _rel(plan(_noise()), ref) <= 1e-6  # measured 1.8e-7 (float32 state, 2 euler steps); 5x margin


def test_describe_and_properties():
    plan = fs.compile(as_plan_model(toy_net), VP, solver="euler", nfe=3, shape=SHAPE, device=DEV,
                      guidance_scale=None)
    text = plan.describe()
    assert plan.nfe == 3 and len(plan.timesteps) == 3
    for t in plan.timesteps:
        assert f"t_in={t:.6g}" in text
    assert "shape=(3, 2, 5, 7)" in text and "stage 3" in text


def test_save_load_roundtrip(tmp_path):
    model = as_plan_model(guided_toy_net)
    plan = fs.compile(model, VP, solver="euler", nfe=3, shape=SHAPE, device=DEV, guidance_scale=2.5)
    plan.save(tmp_path / "p.plan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fs.load(tmp_path / "p.plan", model, device=DEV)
    assert again.timesteps == plan.timesteps and again.kernel_config == plan.kernel_config
    assert torch.equal(again(_noise()), plan(_noise()))
    (tmp_path / "bad.plan").write_bytes(b"")
    with pytest.raises(fs.PlanFileError, match="empty file"):  # more bad files: test_plan_file.py
        fs.load(tmp_path / "bad.plan", model)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_stage_with_an_all_zero_output(kernels):
    """A stage whose output is exactly zero has no inputs in the IR; the plan still writes the zeros."""
    b = fs.solvers.ProgramBuilder("zero", VP)
    pts = fs.solvers.make_grid(VP, fs.solvers.Spacing("linspace"), 1).points
    x = b.start(1.0)
    b.call(x, pts[0], keep=[])
    prog = b.finish(fs.solvers.Lin())
    plan = Plan(as_plan_model(toy_net), prog, shape=SHAPE, device=DEV, kernels=kernels)
    out = plan(_noise()).cpu()
    ref = fs.solvers.run_reference(prog, toy_net, _noise().double().cpu())
    assert torch.equal(out, torch.zeros(SHAPE)) and torch.equal(ref, torch.zeros(SHAPE, dtype=torch.float64))
