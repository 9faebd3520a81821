"""DPM-Solver++ (multistep, SDE, singlestep) against diffusers' own schedulers, same config / NFE / noise."""

import itertools
import math

import pytest
import torch

import fewstep as fs
from fewstep.solvers.algo_dpm import _phis, multistep_orders, singlestep_orders
from fewstep.solvers.grids import dpm_grid
from fewstep.solvers.reference import count_calls
from fewstep.solvers.spacing import Spacing, as_spacing

from .harness import (
    FixedSDE3Scheduler,
    assert_matches_diffusers,
    diffusers_sample,
    guided_toy_model,
    rel_err,
    toy_model,
)

diffusers = pytest.importorskip("diffusers")

VP = fs.schedules.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SPACINGS = ["linspace", "leading", "trailing", "karras", "exponential", "beta"]
PREDS = ["epsilon", "v_prediction", "sample"]
NFES = [1, 2, 3, 5, 8]


def _spacing(name: str) -> Spacing:
    return Spacing(name, steps_offset=1) if name == "leading" else Spacing(name)


def _check(name, spec, nfe, spacing, *, guidance=None, scheduler=None, seed=0, **opts):
    """Build ``name``, run it and diffusers' loop with the same noise; compare samples, call count, times."""
    sp = _spacing(spacing) if isinstance(spacing, str) else spacing
    sch = scheduler if scheduler is not None else fs.solvers.to_diffusers(name, spec, sp, **opts)
    prog = fs.solvers.build(name, spec, nfe, sp, guidance_scale=guidance, **opts)
    g = torch.Generator().manual_seed(1000 * nfe + seed)
    noise = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    step_noise = None
    if fs.solvers.get(name).is_stochastic(fs.solvers.get(name).options(**opts)):
        step_noise = [torch.randn(noise.shape, generator=g, dtype=torch.float64) for _ in range(nfe)]
    model = guided_toy_model if guidance is not None else toy_model
    assert prog.nfe == nfe
    # measured 3.4e-6 over these grids (float32 tables in diffusers, 3m at nfe 8); 3x margin
    assert_matches_diffusers(sch, prog, model, noise, nfe, guidance_scale=guidance, step_noise=step_noise,
                             rtol=1e-5, time_atol=1e-6, what=f"{name} {spacing} nfe={nfe} {opts}")
    return prog


# -- multistep ODE / SDE ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_multistep_matches_diffusers(name, pred, spacing, final):
    spec = fs.ModelSpec(VP, pred)
    for nfe in NFES:
        sch = None
        if name == "dpmpp_3m_sde":
            cfg = dict(fs.solvers.to_diffusers(name, spec, _spacing(spacing), final=final).config)
            sch = FixedSDE3Scheduler.from_config(cfg)
        _check(name, spec, nfe, spacing, final=final, scheduler=sch)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("opts", [
    dict(solver_type="heun"),
    dict(lower_order_final=False, final="sigma_min"),
    dict(lower_order_final=False, solver_type="heun", final="sigma_min"),
    dict(euler_at_final=True, final="sigma_min"),
    dict(order=1),
])
@pytest.mark.parametrize("nfe", [2, 4, 7, 16])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_multistep_options_match_diffusers(name, opts, nfe, spacing):
    spec = fs.ModelSpec(VP, "epsilon")
    sch = None
    if name == "dpmpp_3m_sde":
        sch = FixedSDE3Scheduler.from_config(fs.solvers.to_diffusers(name, spec, spacing, **opts).config)
    _check(name, spec, nfe, spacing, scheduler=sch, **opts)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("nfe", [14, 15, 16])
def test_lower_order_final_boundary_matches_diffusers(name, final, nfe):
    """diffusers lowers the last steps' orders (lower_order_final) only below 15 steps: NFE 14, 15 and 16
    on either side of that boundary, with both endings."""
    spec = fs.ModelSpec(VP, "epsilon")
    for spacing in ("linspace", "trailing"):
        sch = None
        if name == "dpmpp_3m_sde":
            cfg = fs.solvers.to_diffusers(name, spec, spacing, final=final).config
            sch = FixedSDE3Scheduler.from_config(cfg)
        _check(name, spec, nfe, spacing, final=final, scheduler=sch)


@pytest.mark.parametrize("name,opts", [("dpmpp_3m", {}), ("dpmpp_2m", dict(solver_type="heun")),
                                       ("dpmpp_2m_sde", dict(solver_type="heun"))])
def test_zero_length_last_step_is_identity(name, opts):
    """karras / exponential / beta already end on sigma_min, so final="sigma_min" repeats it: a step with
    h = 0.  diffusers' third-order and heun weights are 0/0 there (NaN from nfe >= 15, where lower_order_final
    is off); ours is the exact limit, an identity step, so the result equals the euler_at_final one."""
    spec = fs.ModelSpec(VP, "epsilon")
    sch = fs.solvers.to_diffusers(name, spec, "karras", final="sigma_min", **opts)
    noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    step_noise = [torch.randn(3, 8, dtype=torch.float64) for _ in range(16)] if "sde" in name else None
    ref, _ = diffusers_sample(sch, toy_model, noise, 16, step_noise=step_noise)
    if "sde" not in name:
        assert torch.isnan(ref).all(), "diffusers no longer NaNs here: drop this note"
    prog = fs.solvers.build(name, spec, 16, "karras", final="sigma_min", **opts)
    last = prog.stages[-1].rows().get("x", {})
    assert list(last.values()) in ([], [1.0]) and "O_c" not in last  # x' = x: the network output is unused
    euler = _check(name, spec, 16, "karras", final="sigma_min", euler_at_final=True, **opts)
    ours = fs.solvers.run_reference(prog, toy_model, noise, step_noise=step_noise)
    theirs = fs.solvers.run_reference(euler, toy_model, noise, step_noise=step_noise)
    assert rel_err(ours, theirs) < 1e-12


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s"])
@pytest.mark.parametrize("nfe", [1, 3, 6])
def test_guidance_matches_diffusers(name, nfe):
    spec = fs.ModelSpec(VP, "v_prediction")
    sch = None
    if name == "dpmpp_3m_sde":
        sch = FixedSDE3Scheduler.from_config(fs.solvers.to_diffusers(name, spec, "linspace").config)
    _check(name, spec, nfe, "linspace", guidance=3.5, scheduler=sch)


@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
def test_3m_sde_matches_stock_diffusers_below_third_order(nfe):
    """With nfe <= 4 and lower_order_final no step is third order: stock diffusers, no patch."""
    spec = fs.ModelSpec(VP, "epsilon")
    prog = _check("dpmpp_3m_sde", spec, nfe, "karras")
    assert max(s.info["order"] for s in prog.stages if s.call) <= 2


def test_stock_diffusers_3m_sde_third_order_differs():
    """Documents the diffusers bug we correct: if this starts failing, diffusers fixed its D2 weight and
    FixedSDE3Scheduler can go."""
    spec = fs.ModelSpec(VP, "epsilon")
    with pytest.raises(AssertionError, match="rel err"):
        _check("dpmpp_3m_sde", spec, 8, "karras")


def test_zero_snr_vpred_matches_diffusers():
    sched = fs.schedules.DiscreteVP(beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True)
    spec = fs.ModelSpec(sched, "v_prediction")
    for nfe in (3, 8):
        _check("dpmpp_2m", spec, nfe, "trailing")
        _check("dpmpp_2m_sde", spec, nfe, "trailing")


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matches_diffusers_use_flow_sigmas(name, shift):
    spec = fs.ModelSpec(fs.schedules.Flow(shift=shift), "flow")
    cls = diffusers.DPMSolverSinglestepScheduler if name == "dpmpp_2s" else FixedSDE3Scheduler
    for nfe in NFES:
        o = fs.solvers.get(name).options()
        algo = "sde-dpmsolver++" if name.endswith("sde") else "dpmsolver++"
        sch = cls(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                  solver_order=o.order, algorithm_type=algo)
        assert fs.ModelSpec.from_diffusers_scheduler_config(sch.config) == spec
        _check(name, spec, nfe, "flow", scheduler=sch)


@pytest.mark.parametrize("name,opts", [
    ("dpmpp_2m", {}), ("dpmpp_2m", dict(solver_type="heun")), ("dpmpp_3m", {})])
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_edm_matches_diffusers_edm_dpmsolver(name, opts, pred, final):
    """EDMDPMSolverMultistepScheduler works on preconditioned networks (c_in, c_skip, c_out, 0.25 log sigma):
    wrap our network into that form for diffusers' side.  Its init_noise_sigma is sqrt(sigma_max^2 + 1) where
    the ODE starts at sigma_max, so its noise is pre-scaled to start at the same x."""
    edm = fs.schedules.EDM(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    spec, sd = fs.ModelSpec(edm, pred), edm.sigma_data
    o = fs.solvers.get(name).options(**opts)

    def preconditioned(inp, t):
        sigma = math.exp(4.0 * t)
        x = inp * math.sqrt(sigma**2 + sd**2)
        cx, co = spec.x0_coeffs(fs.schedules.Point(1.0, sigma, sigma))
        x0 = cx * x + co * toy_model(x, sigma)
        return (x0 - sd**2 / (sigma**2 + sd**2) * x) / (sigma * sd / math.sqrt(sigma**2 + sd**2))

    for nfe in NFES:
        sch = diffusers.EDMDPMSolverMultistepScheduler(
            sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, sigma_data=sd, solver_order=o.order,
            solver_type=o.solver_type, final_sigmas_type=final, prediction_type="epsilon")
        prog = fs.solvers.build(name, spec, nfe, "karras", final=final, **opts)
        noise = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(nfe), dtype=torch.float64)
        start = edm.sigma_max / sch.init_noise_sigma
        ref, times = diffusers_sample(sch, preconditioned, noise * start, nfe)
        fn, seen = count_calls(toy_model)
        ours = fs.solvers.run_reference(prog, fn, noise)
        assert len(seen) == prog.nfe == nfe
        assert seen == pytest.approx([math.exp(4 * t) for t in times], rel=1e-6)
        assert rel_err(ours, ref) <= 1e-5, (nfe, rel_err(ours, ref))


# -- singlestep -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("spacing", ["linspace", "karras", "exponential", "beta"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_singlestep_matches_diffusers(order, solver_type, spacing, final):
    for pred in PREDS:
        spec = fs.ModelSpec(VP, pred)
        for nfe in (1, 2, 3, 5, 6):
            _check("dpmpp_2s", spec, nfe, spacing, order=order, solver_type=solver_type, final=final)


@pytest.mark.parametrize("order", [2, 3])
def test_singlestep_without_lower_order_final(order):
    spec = fs.ModelSpec(VP, "epsilon")
    _check("dpmpp_2s", spec, 6, "karras", order=order, final="sigma_min", lower_order_final=False)
    assert singlestep_orders(6, fs.solvers.get("dpmpp_2s").options(
        order=order, final="sigma_min", lower_order_final=False)) == list(range(1, order + 1)) * (6 // order)


# -- order rules, math, validation ------------------------------------------------------------------------
def test_order_schedules():
    o3 = fs.solvers.get("dpmpp_3m").options()
    assert multistep_orders(1, o3) == [1]
    assert multistep_orders(5, o3) == [1, 2, 3, 2, 1]
    assert multistep_orders(16, o3) == [1, 2] + [3] * 13 + [1]  # final="zero" forces first order
    o3s = fs.solvers.get("dpmpp_3m").options(final="sigma_min")
    assert multistep_orders(16, o3s) == [1, 2] + [3] * 14
    assert multistep_orders(15, o3s) == [1, 2] + [3] * 13  # lower_order_final applies below 15 steps only
    assert multistep_orders(14, o3s) == [1, 2] + [3] * 10 + [2, 1]
    o2s = fs.solvers.get("dpmpp_2s").options(order=3)
    assert singlestep_orders(7, o2s) == [1, 2, 3, 1, 2, 3, 1]
    assert singlestep_orders(5, o2s) == [1, 2, 3, 1, 1]


@pytest.mark.parametrize("g", [1e-3, 0.1, 1.0, 4.0])
def test_exponential_integrator_weights_are_exact(g):
    """phi1, w1, w2 against the integrals that define them (u = lambda - lambda_s over [0, g])."""
    from scipy.integrate import quad

    k = lambda u: math.exp(-(g - u))  # noqa: E731
    phi1, w1, w2 = _phis(g)
    assert phi1 == pytest.approx(quad(k, 0, g)[0], rel=1e-10)
    assert w1 == pytest.approx(quad(lambda u: u / g * k(u), 0, g)[0], rel=1e-7)
    assert w2 == pytest.approx(quad(lambda u: u * u / (2 * g * g) * k(u), 0, g)[0], rel=1e-6)


def test_history_uses_few_registers():
    spec = fs.ModelSpec(VP)
    assert fs.solvers.build("dpmpp_2m", spec, 8).history_size == 1
    assert fs.solvers.build("dpmpp_3m", spec, 8).history_size == 2  # x0_{i-1}, x0_{i-2}; x_eval lives in x
    assert fs.solvers.build("dpmpp_2s", spec, 8, order=3).history_size == 2
    sde = fs.solvers.build("dpmpp_2m_sde", spec, 5)
    assert sde.stochastic and [s.noise for s in sde.stages] == [False, True, True, True, True, False]


@pytest.mark.parametrize("name,opts", [
    ("dpmpp_2m", dict(order=4)),
    ("dpmpp_2m", dict(order=0)),
    ("dpmpp_3m", dict(solver_type="bh2")),
    ("dpmpp_2m_sde", dict(final="max")),
    ("dpmpp_2s", dict(order=5)),
    ("dpmpp_2m", dict(algorithm_type="dpmsolver")),
])
def test_bad_options_raise(name, opts):
    with pytest.raises(ValueError):
        fs.solvers.build(name, fs.ModelSpec(VP), 4, **opts)


def test_no_diffusers_equivalent_raises():
    with pytest.raises(ValueError, match="Singlestep"):
        fs.solvers.to_diffusers("dpmpp_2s", fs.ModelSpec(VP), "trailing")


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s"])
@pytest.mark.parametrize("schedule,pred,spacings", [
    (fs.schedules.EDM(), "epsilon", ["karras", "exponential"]),
    (fs.schedules.Flow(shift=3.0), "flow", ["flow", "karras", "beta"]),  # karras / beta start at t = 1
    (fs.schedules.DiscreteVP(beta_schedule="squaredcos_cap_v2"), "v_prediction", ["linspace", "karras"]),
])
def test_other_schedules_build_finite_programs(name, schedule, pred, spacings):
    spec = fs.ModelSpec(schedule, pred)
    for nfe, spacing, final in itertools.product((1, 2, 5, 12), spacings, ("zero", "sigma_min")):
        prog = fs.solvers.build(name, spec, nfe, spacing, final=final)
        assert prog.nfe == nfe
        x = fs.solvers.run_reference(prog, toy_model, torch.randn(2, 9, dtype=torch.float64),
                                     generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all()


# -- EDM / flow, where diffusers has no like-for-like scheduler: convergence to an exact solution --------
def _gaussian_error(name, spec, nfe, c=0.7, **opts):
    """Relative error against the exact PF-ODE solution for data ~ N(0, c^2): x is proportional to
    sqrt(alpha^2 c^2 + sigma^2) along it."""
    prog = fs.solvers.build(name, spec, nfe, final="sigma_min", **opts)
    points = {call.time: call.point for call in prog.calls}

    def model(x, t):
        a, s = points[t].alpha, points[t].sigma
        x0 = a * c * c / (a * a * c * c + s * s) * x
        eps = (x - a * x0) / s
        outputs = {"epsilon": eps, "flow": eps - x0, "sample": x0, "v_prediction": a * eps - s * x0}
        return outputs[spec.prediction]

    noise = torch.randn(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = fs.solvers.run_reference(prog, model, noise)
    x_start = prog.stages[0].coef("net_in", "x") * noise
    sp = as_spacing(prog.options["spacing"], spec)
    first = prog.calls[0].point
    end = dpm_grid(fs.solvers.BuildContext(name, spec, nfe, sp, None), "sigma_min").points[-1]
    std = lambda p: math.sqrt(p.alpha**2 * c * c + p.sigma**2)  # noqa: E731
    return rel_err(out, std(end) / std(first) * x_start)


@pytest.mark.parametrize("schedule,pred", [
    (fs.schedules.EDM(), "epsilon"), (fs.schedules.EDM(), "v_prediction"),
    (fs.schedules.Flow(shift=3.0), "flow")])
@pytest.mark.parametrize("name,opts,rate", [
    ("dpmpp_2m", dict(order=1), 1.6), ("dpmpp_2m", {}, 3.0), ("dpmpp_2m", dict(solver_type="heun"), 3.0),
    ("dpmpp_2s", {}, 3.0)])
def test_converges_on_gaussian_data(schedule, pred, name, opts, rate):
    """Halving the step size divides the error by ~2^order (first order: 2, second: 4)."""
    spec = fs.ModelSpec(schedule, pred)
    e32, e64 = _gaussian_error(name, spec, 32, **opts), _gaussian_error(name, spec, 64, **opts)
    assert e64 < e32 / rate, (e32, e64)
