import math

import numpy as np
import pytest
import torch

import fewstep as fs
from fewstep.solvers.algo_deis import logrho_weights
from fewstep.solvers.reference import count_calls

from .harness import diffusers_sample, guided_toy_model, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")

BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SIGMA_SPACINGS = ("karras", "exponential", "beta")
OPTIONS = [dict(), dict(order=3), dict(order=1), dict(order=3, lower_order_final=False)]


def _spec(pred: str, **extra) -> fs.ModelSpec:
    return fs.ModelSpec.from_diffusers_scheduler_config(dict(BASE, prediction_type=pred, **extra))


def _noise(seed: int, shape=(2, 3, 4, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _float64_table(sch):
    """diffusers computes DEIS's log-rho coefficients from its float32 sigma table; the differences of
    antiderivatives cancel, moving order-3 samples by up to ~1e-3 relative on close beta-spaced points.
    Upcasting the same table values compares the algorithms rather than float32 rounding."""
    orig = sch.set_timesteps

    def set_timesteps(*args, **kwargs):
        orig(*args, **kwargs)
        sch.sigmas = sch.sigmas.double()

    sch.set_timesteps = set_timesteps
    return sch


def _run(spec, spacing, nfe, opts, model=toy_model, guidance_scale=None):
    prog = fs.solvers.build("deis", spec, nfe, spacing, guidance_scale=guidance_scale, **opts)
    fn, seen = count_calls(model)
    return prog, fs.solvers.run_reference(prog, fn, _noise(nfe)), seen


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("nfe", [1, 2, 3, 6])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "-")
def test_deis_matches_diffusers(pred, spacing, nfe, opts):
    opts = dict(opts, final="sigma_min")  # DEISMultistepScheduler always ends at sigma_min
    spec = _spec(pred)
    sp = fs.solvers.Spacing(spacing, steps_offset=1 if spacing == "leading" else 0)
    sch = _float64_table(fs.solvers.to_diffusers("deis", spec, sp, **opts))
    ref, times = diffusers_sample(sch, toy_model, _noise(nfe), nfe)
    prog, ours, seen = _run(spec, sp, nfe, opts)
    assert len(seen) == prog.nfe == nfe == len(times)
    assert seen == pytest.approx(times, abs=1e-3)
    # measured 8.7e-14 (float64 tables on both sides); 11x margin
    assert rel_err(ours, ref) <= 1e-12


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", SIGMA_SPACINGS)
@pytest.mark.parametrize("nfe", [1, 2, 3, 6])
@pytest.mark.parametrize("opts", [dict(order=1), dict(order=2, lower_order_final=False),
                                  dict(order=3, lower_order_final=False)], ids=["o1", "o2", "o3"])
def test_deis_sigma_spacings_do_not_waste_a_call(pred, spacing, nfe, opts):
    """diffusers appends a copy of the last karras / exponential / beta sigma, so its last step goes nowhere
    and its last call is wasted: its nfe + 1 calls give exactly our nfe-call sample, with the same first nfe
    times.  (lower_order_final=False: diffusers' lower-order rule counts the wasted step, ours does not.)"""
    opts = dict(opts, final="sigma_min")
    spec = _spec(pred)
    cfg = dict(BASE, prediction_type=pred, solver_order=opts["order"],
               lower_order_final=opts.get("lower_order_final", True), **{f"use_{spacing}_sigmas": True})
    sch = _float64_table(diffusers.DEISMultistepScheduler(**cfg))
    ref, times = diffusers_sample(sch, toy_model, _noise(nfe), nfe + 1)
    assert sch.sigmas[-1] == sch.sigmas[-2]  # the repeated point we avoid
    prog, ours, seen = _run(spec, spacing, nfe, opts)
    assert len(seen) == prog.nfe == nfe
    assert all(a > b for a, b in zip(prog.sigmas, prog.sigmas[1:]))
    assert "O_c" in prog.stages[-1].rows()["x"]  # the last call moves the sample
    assert seen == pytest.approx(times[:-1], abs=1e-3)
    # measured 7.7e-13 (float64 tables on both sides); 6x margin
    assert rel_err(ours, ref) <= 5e-12


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_deis_default_matches_float32_diffusers(pred, spacing):
    """Order 2 against diffusers exactly as users run it (float32 sigma table)."""
    spec = _spec(pred)
    sch = fs.solvers.to_diffusers("deis", spec, spacing, final="sigma_min")
    ref, _ = diffusers_sample(sch, toy_model, _noise(6), 6)
    _, ours, _ = _run(spec, spacing, 6, dict(final="sigma_min"))
    # measured 7.0e-7 (float32 diffusers tables); 4x margin
    assert rel_err(ours, ref) <= 3e-6


def test_deis_guidance_matches_diffusers():
    opts = dict(order=3, final="sigma_min")
    spec = _spec("epsilon")
    sch = _float64_table(fs.solvers.to_diffusers("deis", spec, "trailing", **opts))
    ref, _ = diffusers_sample(sch, guided_toy_model, _noise(5), 5, guidance_scale=3.0)
    _, ours, seen = _run(spec, "trailing", 5, opts, model=guided_toy_model, guidance_scale=3.0)
    assert len(seen) == 5
    # measured 3.8e-16 (float64); 25x margin for another libm
    assert rel_err(ours, ref) <= 1e-14


@pytest.mark.parametrize("nodes", [(0.9,), (2.0, 5.0), (0.3, 0.8, 2.5), (1.0, 1.7, 4.0, 11.0)])
@pytest.mark.parametrize("rho_t", [0.05, 0.5])
def test_logrho_weights_match_quadrature(nodes, rho_t):
    """c_j = integral of the Lagrange basis in log-rho, checked against adaptive quadrature."""
    from scipy.integrate import quad

    u = np.log(nodes)
    for j, c in enumerate(logrho_weights(rho_t, list(nodes))):
        def basis(r, j=j):
            return np.prod([(math.log(r) - u[m]) / (u[j] - u[m]) for m in range(len(u)) if m != j])

        ref, _ = quad(basis, nodes[0], rho_t, epsabs=1e-13, epsrel=1e-12)
        assert c == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_logrho_weights_are_continuous_at_zero():
    nodes = [0.4, 0.9, 2.0]
    at_zero = logrho_weights(0.0, nodes)
    near = logrho_weights(1e-14, nodes)
    assert all(math.isfinite(c) for c in at_zero)
    assert at_zero == pytest.approx(near, abs=1e-10)  # the gap is ~ rho log(rho)^2
    assert sum(at_zero) == pytest.approx(-nodes[0])  # the weights reproduce constants exactly


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_to_zero_is_finite_and_continuous(order):
    """final='zero' (no diffusers equivalent): every order is finite on a 16-step grid (no lower-order final
    step), and agrees with the same grid ending at a tiny sigma."""
    spec = _spec("epsilon")
    grid = fs.solvers.make_grid(spec, fs.solvers.Spacing("karras"), 16)
    sig = [p.sigma_tilde for p in grid.points]
    zero = fs.solvers.build("deis", spec, 16, fs.solvers.Spacing("sigmas", values=sig), order=order)
    tiny_end = fs.solvers.Spacing("sigmas", values=sig[:-1] + [1e-12])
    tiny = fs.solvers.build("deis", spec, 16, tiny_end, order=order)
    assert [s.info["order"] for s in zero.stages[1:]][-1] == order
    a = fs.solvers.run_reference(zero, toy_model, _noise(order))
    b = fs.solvers.run_reference(tiny, toy_model, _noise(order))
    assert rel_err(a, b) <= 1e-9


def test_deis_order1_is_ddim():
    """DEIS-1 = DDIM: diffusers' UniPC at order 1 without corrector takes the same steps, down to sigma 0."""
    spec = _spec("v_prediction")
    sch = fs.solvers.to_diffusers("unipc", spec, "trailing", order=1, corrector=False)
    ref, _ = diffusers_sample(sch, toy_model, _noise(4), 4)
    _, ours, _ = _run(spec, "trailing", 4, dict(order=1))
    # measured 2.1e-7 (float32 diffusers tables); 5x margin
    assert rel_err(ours, ref) <= 1e-6


def test_deis_on_edm_and_flow_is_finite():
    for spec, sp in [(fs.ModelSpec(fs.schedules.EDM(), "epsilon"), "karras"),
                     (fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow"), "flow")]:
        for order in (1, 2, 3):
            prog = fs.solvers.build("deis", spec, 6, sp, order=order)
            assert prog.nfe == 6
            assert torch.isfinite(fs.solvers.run_reference(prog, toy_model, _noise(order))).all()


@pytest.mark.parametrize("bad", [dict(order=4), dict(order=0), dict(order=True), dict(final="no"),
                                 dict(rho=7)])
def test_deis_bad_options_raise(bad):
    with pytest.raises(ValueError):
        fs.solvers.build("deis", _spec("epsilon"), 4, **bad)


@pytest.mark.parametrize("spacing, opts", [("linspace", dict()), ("karras", dict(final="sigma_min")),
                                           ("linspace", dict(final="sigma_min", euler_at_final=True))])
def test_deis_no_diffusers_equivalent_raises(spacing, opts):
    with pytest.raises(ValueError):
        fs.solvers.to_diffusers("deis", _spec("epsilon"), spacing, **opts)
