import pytest
import torch

import fewstep as fs
from fewstep.solvers.reference import count_calls

from .harness import assert_matches_diffusers, diffusers_sample, guided_toy_model, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")

BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SIGMA_SPACINGS = ("karras", "exponential", "beta")

OPTIONS = [
    dict(),
    dict(order=3, solver_type="bh1", final="sigma_min"),
    dict(order=1),
    dict(order=3, corrector=False),
    dict(predict_x0=False, final="sigma_min"),
    dict(lower_order_final=False, final="sigma_min", disable_corrector=(0, 2)),
]


def _spec(pred: str, **extra) -> fs.ModelSpec:
    return fs.ModelSpec.from_diffusers_scheduler_config(dict(BASE, prediction_type=pred, **extra))


def _noise(seed: int, shape=(2, 3, 4, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _after_set_timesteps(sch, fn):
    """Run ``fn(scheduler)`` right after every ``set_timesteps`` (to edit diffusers' sigma table)."""
    orig = sch.set_timesteps

    def set_timesteps(*args, **kwargs):
        orig(*args, **kwargs)
        fn(sch)

    sch.set_timesteps = set_timesteps
    return sch


def _float64_table(sch):
    """diffusers keeps its sigma table in float32 and computes UniPC's coefficients in it, which moves samples
    by ~1e-5 (e.g. sample prediction with predict_x0=False).  Upcasting the same table values compares the
    algorithms rather than float32 rounding (they then agree to ~1e-10)."""
    sch.sigmas = sch.sigmas.double()


def _check_parity(spec, spacing, nfe, opts, model=toy_model, guidance_scale=None, seed=0):
    sch = _after_set_timesteps(fs.solvers.to_diffusers("unipc", spec, spacing, **opts), _float64_table)
    prog = fs.solvers.build("unipc", spec, nfe, spacing, guidance_scale=guidance_scale, **opts)
    noise = _noise(seed + nfe)
    assert prog.nfe == nfe
    # measured 1.1e-12 (float64 tables both sides; exponential spacing, sample prediction, predict_x0=False),
    # 1.5e-13 elsewhere; 9x margin
    assert_matches_diffusers(sch, prog, model, noise, nfe, rtol=1e-11, guidance_scale=guidance_scale,
                             what=f"unipc {spacing} {opts}")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", *SIGMA_SPACINGS])
@pytest.mark.parametrize("nfe", [1, 2, 3, 6])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "-")
def test_unipc_matches_diffusers(pred, spacing, nfe, opts):
    if nfe == 1 and spacing in SIGMA_SPACINGS and opts.get("final") == "sigma_min":
        pytest.skip("diffusers quirk: a 1-point sigma spacing ends on its own last sigma = sigma_max")
    sp = fs.solvers.Spacing(spacing, steps_offset=1 if spacing == "leading" else 0)
    _check_parity(_spec(pred), sp, nfe, opts)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "karras", "exponential"])
def test_unipc_default_matches_float32_diffusers(pred, spacing):
    """The default configuration against diffusers exactly as users run it (float32 sigma table)."""
    spec = _spec(pred)
    sch = fs.solvers.to_diffusers("unipc", spec, spacing)
    ref, _ = diffusers_sample(sch, toy_model, _noise(11), 6)
    ours = fs.solvers.run_reference(fs.solvers.build("unipc", spec, 6, spacing), toy_model, _noise(11))
    # measured 3.7e-7 (float32 diffusers tables); 5x margin
    assert rel_err(ours, ref) <= 2e-6


@pytest.mark.parametrize("opts", [dict(), dict(order=3, solver_type="bh1", final="sigma_min")])
def test_unipc_guidance_matches_diffusers(opts):
    _check_parity(_spec("epsilon"), "trailing", 5, opts, model=guided_toy_model, guidance_scale=4.5)


def test_unipc_squaredcos_and_zero_snr_match_diffusers():
    # UniPC rounds / truncates these times even for squaredcos (DPM does not).  Not beta: its times collide
    # (998, 998, 998) and diffusers' timestep -> step-index lookup then breaks.
    for spacing in ("karras", "exponential"):
        _check_parity(_spec("epsilon", beta_schedule="squaredcos_cap_v2"), spacing, 4, dict(order=3))
    _check_parity(_spec("v_prediction", rescale_betas_zero_snr=True), "trailing", 4, dict())


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("nfe", [1, 2, 3, 6])
@pytest.mark.parametrize("opts", [dict(), dict(order=3, solver_type="bh1", final="sigma_min"), dict(order=1)],
                         ids=["default", "o3-bh1-smin", "o1"])
def test_unipc_flow_matches_diffusers(shift, nfe, opts):
    """UniPC's own flow grid (use_flow_sigmas): n points of linspace(1, 1/T, n + 1), the first at 1 - 1e-6."""
    spec = fs.ModelSpec(fs.schedules.Flow(shift=shift), "flow")
    sch = fs.solvers.to_diffusers("unipc", spec, "flow", **opts)
    sch.register_to_config(flow_shift=shift)  # the base config names the shift as FlowMatch does ("shift")
    _after_set_timesteps(sch, _float64_table)
    prog = fs.solvers.build("unipc", spec, nfe, "flow", **opts)
    ref, times = diffusers_sample(sch, toy_model, _noise(nfe), nfe)
    fn, seen = count_calls(toy_model)
    ours = fs.solvers.run_reference(prog, fn, _noise(nfe))
    assert len(seen) == prog.nfe == nfe == len(times)
    assert seen == pytest.approx(times, abs=1e-3)
    # measured 8.0e-16 (float64 on both sides); 12x margin
    assert rel_err(ours, ref) <= 1e-14


def test_unipc_flow_dynamic_shift_matches_diffusers():
    """Flux-style dynamic shifting: Flow(mu=...) against use_dynamic_shifting with set_timesteps(mu=...)."""
    spec = fs.ModelSpec(fs.schedules.Flow(mu=0.8), "flow")
    sch = fs.solvers.to_diffusers("unipc", spec, "flow", order=3)
    sch.register_to_config(use_dynamic_shifting=True)
    _after_set_timesteps(sch, _float64_table)
    ref, times = diffusers_sample(sch, toy_model, _noise(4), 4, set_timesteps_kwargs=dict(mu=0.8))
    prog = fs.solvers.build("unipc", spec, 4, "flow", order=3)
    fn, seen = count_calls(toy_model)
    ours = fs.solvers.run_reference(prog, fn, _noise(4))
    assert seen == pytest.approx(times, abs=1e-3)
    # measured 3.9e-16 (float64 on both sides); 25x margin
    assert rel_err(ours, ref) <= 1e-14


def _tiny_final_sigma(sch):
    _float64_table(sch)
    sch.sigmas[-1] = 1e-10


@pytest.mark.parametrize("opts", [dict(solver_type="bh1"), dict(predict_x0=False)])
@pytest.mark.parametrize("nfe", [1, 4])
def test_unipc_zero_final_is_the_limit_of_a_tiny_final_sigma(opts, nfe):
    """diffusers returns NaN here (bh1: B(h) = h = inf times 0; predict_x0=False: sigma_t (e^h - 1) =
    0 * inf); ours is finite and equals diffusers' own result on a grid whose last sigma is 1e-10, not 0."""
    spec = _spec("epsilon")
    prog = fs.solvers.build("unipc", spec, nfe, "karras", **opts)
    noise = _noise(nfe)
    ours = fs.solvers.run_reference(prog, toy_model, noise)
    assert torch.isfinite(ours).all()
    sch = _after_set_timesteps(fs.solvers.to_diffusers("unipc", spec, "karras", **opts), _tiny_final_sigma)
    ref, _ = diffusers_sample(sch, toy_model, noise, nfe)
    # measured 6.4e-10 (the sigma = 1e-10 grid's distance from the limit); 15x margin
    assert rel_err(ours, ref) <= 1e-8


def test_unipc_no_lower_order_final_steps_to_zero_with_first_order():
    """UniP-p for p >= 2 diverges on the step to sigma = 0 (diffusers: inf); the last step is taken with
    p = 1, which for order 2 is exactly diffusers' lower_order_final=True run."""
    spec = _spec("v_prediction")
    prog = fs.solvers.build("unipc", spec, 5, "trailing", lower_order_final=False)
    assert [s.info["order"] for s in prog.stages[1:]] == [1, 2, 2, 2, 1]
    noise = _noise(5)
    ours = fs.solvers.run_reference(prog, toy_model, noise)
    sch = fs.solvers.to_diffusers("unipc", spec, "trailing", lower_order_final=True)
    ref, _ = diffusers_sample(sch, toy_model, noise, 5)
    # measured 1.6e-7 (float32 diffusers tables); 6x margin
    assert rel_err(ours, ref) <= 1e-6


def test_unipc_repeated_final_sigma_order3():
    """karras + sigma_min repeats the last sigma; diffusers' order-3 predictor then solves a system with
    infinite entries (NaN).  That step is the identity: our result is diffusers' corrected last sample."""
    spec = _spec("epsilon")
    opts = dict(order=3, lower_order_final=False, final="sigma_min")
    prog = fs.solvers.build("unipc", spec, 5, "karras", **opts)
    noise = _noise(7)
    ours = fs.solvers.run_reference(prog, toy_model, noise)
    sch = fs.solvers.to_diffusers("unipc", spec, "karras", **opts)
    diffusers_sample(sch, toy_model, noise, 5)
    # measured 1.2e-7 (float32 diffusers tables); 9x margin
    assert rel_err(ours, sch.last_sample) <= 1e-6


def test_unipc_corrector_changes_the_result():
    spec = _spec("epsilon")
    a = fs.solvers.run_reference(fs.solvers.build("unipc", spec, 4), toy_model, _noise(1))
    b = fs.solvers.run_reference(fs.solvers.build("unipc", spec, 4, corrector=False), toy_model, _noise(1))
    assert rel_err(a, b) > 1e-4


def test_unipc_on_edm_and_flow_is_finite():
    flow = fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow")
    for spec, sp in [(fs.ModelSpec(fs.schedules.EDM(), "epsilon"), "karras"), (flow, "karras"),
                     (flow, fs.solvers.Spacing("sigmas", values=[1.0, 0.6, 0.3, 0.1, 0.05, 0.02, 0.0]))]:
        for order in (1, 2, 3):
            prog = fs.solvers.build("unipc", spec, 6, sp, order=order)
            assert prog.nfe == 6
            assert torch.isfinite(fs.solvers.run_reference(prog, toy_model, _noise(order))).all()


def test_unipc_registry_metadata():
    info = fs.solvers.get("unipc")
    assert info.nominal_order(info.options()) == 3
    assert info.nominal_order(info.options(order=3, corrector=False)) == 3
    assert info.nominal_order(info.options(order=1)) == 2
    assert not info.is_stochastic(info.options())


@pytest.mark.parametrize("bad", [dict(order=4), dict(order=0), dict(solver_type="bh3"), dict(final="none"),
                                 dict(disable_corrector=(-1,)), dict(orderr=2)])
def test_unipc_bad_options_raise(bad):
    with pytest.raises(ValueError):
        fs.solvers.build("unipc", _spec("epsilon"), 4, **bad)


def test_unipc_predict_eps_from_pure_noise_raises():
    with pytest.raises(ValueError, match="predict_x0"):
        fs.solvers.build("unipc", fs.ModelSpec(fs.schedules.Flow(), "flow"), 4, "karras", predict_x0=False)


def test_unipc_no_diffusers_equivalent_raises():
    with pytest.raises(ValueError):
        fs.solvers.to_diffusers("unipc", _spec("epsilon"), euler_at_final=True, lower_order_final=False)
