"""The Gaussian-mixture oracle is right: its denoiser, its parameterizations and its ODE endpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep as fs
from fewstep.solvers.gmm import GaussianMixture, end_point, point_of_time, program_error, rms
from fewstep.solvers.schedules import Point

GMM = GaussianMixture.random(d=3, k=3, seed=1, spread=1.5, var_range=(0.2, 0.8))
POINTS = [Point(1.0, 0.3, 0.0), Point(1.0, 2.0, 0.0), Point(0.8, 0.6, 0.0), Point(0.97, 0.05, 0.0),
          Point(0.5, 0.5, 0.0), Point(0.1, 0.9, 0.0)]
SPECS = [
    fs.ModelSpec(fs.schedules.DiscreteVP(), "epsilon"),
    fs.ModelSpec(fs.schedules.DiscreteVP(), "v_prediction"),
    fs.ModelSpec(fs.schedules.DiscreteVP(), "sample"),
    fs.ModelSpec(fs.schedules.EDM(), "epsilon"),
    fs.ModelSpec(fs.schedules.EDM(), "v_prediction"),
    fs.ModelSpec(fs.schedules.EDM(), "sample"),
    fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow"),
    fs.ModelSpec(fs.schedules.Flow(shift=3.0), "epsilon"),
    fs.ModelSpec(fs.schedules.Flow(shift=3.0), "sample"),
]


def _x(n=7, seed=0, scale=1.5):
    return scale * torch.randn(n, GMM.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("p", POINTS, ids=lambda p: f"a{p.alpha}-s{p.sigma}")
def test_denoiser_obeys_tweedie_with_finite_difference_score(p):
    """E[x0|x] = (x + sigma^2 grad log p) / alpha and E[eps|x] = -sigma grad log p, the score taken by central
    differences of the closed-form log density."""
    x = _x() * math.hypot(p.alpha, p.sigma)
    h = 1e-5
    score = torch.zeros_like(x)
    for j in range(GMM.dim):
        e = torch.zeros(GMM.dim, dtype=torch.float64)
        e[j] = h
        lp = GMM.log_density(x + e, p.alpha, p.sigma) - GMM.log_density(x - e, p.alpha, p.sigma)
        score[:, j] = lp / (2 * h)
    x0, eps = GMM.posterior(x, p.alpha, p.sigma)
    assert torch.isfinite(x0).all() and torch.isfinite(eps).all()
    assert torch.allclose(eps, -p.sigma * score, rtol=1e-6, atol=1e-7)
    assert torch.allclose(x0, (x + p.sigma**2 * score) / p.alpha, rtol=1e-6, atol=1e-6)
    assert torch.allclose(p.alpha * x0 + p.sigma * eps, x, atol=1e-12)  # consistent pair


@pytest.mark.parametrize("p", POINTS[:3], ids=lambda p: f"a{p.alpha}-s{p.sigma}")
def test_denoiser_is_the_conditional_mean_by_monte_carlo(p):
    """E[(x0 - D(x)) g(x)] = 0 for test functions g (the defining property of the conditional mean), within
    5 standard errors of a 40k-sample Monte-Carlo estimate; a 5% mis-scaled denoiser fails the same check."""
    gen = torch.Generator().manual_seed(3)
    x0, _ = GMM.sample(40_000, gen)
    x = p.alpha * x0 + p.sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    d, _ = GMM.posterior(x, p.alpha, p.sigma)

    def worst_z(den):
        r = x0 - den
        zs = []
        for g in (torch.ones_like(x), x, torch.tanh(x), torch.roll(x, 1, dims=1) ** 2):
            v = r * g
            zs.append((v.mean(0).abs() / (v.std(0) / math.sqrt(len(v)))).max().item())
        return max(zs)

    assert worst_z(d) < 5.0
    assert worst_z(1.05 * d) > 5.0


def test_single_gaussian_ode_endpoint_is_the_exact_linear_map():
    """For one Gaussian the probability-flow ODE from pure noise is x0 = mu + sqrt(v) * noise exactly."""
    g = GaussianMixture([1.0], [[0.3, -1.0, 2.0]], [[0.5, 2.0, 0.1]])
    noise = _x(11, seed=4, scale=1.0)
    got = g.ode_solve(noise, Point(0.0, 1.0, 0.0), Point(1.0, 0.0, 0.0))
    want = torch.as_tensor(g.means[0]) + torch.as_tensor(g.variances[0]).sqrt() * noise
    assert torch.allclose(got, want, rtol=0, atol=1e-8)
    # the same map in VP coordinates from sigma_tilde = 50 (the Gaussian flow: x_t = alpha mu + s_t n)
    start = Point(1 / math.sqrt(1 + 50.0**2), 50 / math.sqrt(1 + 50.0**2), 0.0)
    s_t = torch.sqrt(start.alpha**2 * torch.as_tensor(g.variances[0]) + start.sigma**2)
    x_start = start.alpha * torch.as_tensor(g.means[0]) + s_t * noise
    assert torch.allclose(g.ode_solve(x_start, start, Point(1.0, 0.0, 0.0)), want, atol=1e-8)


def test_ode_solve_matches_an_independent_sigma_space_integration():
    """The flow-coordinate integrator agrees with dy/dsigma = E[eps|y] integrated directly (EDM space)."""
    from scipy.integrate import solve_ivp

    y0 = 20.0 * _x(5, seed=5, scale=1.0)

    def rhs(s, y):
        return GMM.posterior(torch.from_numpy(y).reshape(y0.shape), 1.0, s)[1].reshape(-1).numpy()

    sol = solve_ivp(rhs, (20.0, 0.0), y0.reshape(-1).numpy(), method="RK45", rtol=1e-10, atol=1e-12)
    want = torch.from_numpy(sol.y[:, -1]).reshape(y0.shape)
    got = GMM.ode_solve(y0, Point(1.0, 20.0, 20.0), Point(1.0, 0.0, 0.0))
    assert rms(got, want) < 1e-7


def test_ode_endpoints_are_distributed_as_the_mixture():
    """Pushing N(0, I) through the ODE from t = 1 gives the data distribution: mean and covariance within
    5 standard errors (3000 samples) and each endpoint nearest the mean of a component drawn as often as the
    weights say."""
    n = 3000
    noise = torch.randn(n, GMM.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = GMM.ode_solve(noise, Point(0.0, 1.0, 0.0), Point(1.0, 0.0, 0.0), rtol=1e-8, atol=1e-10)
    assert torch.isfinite(x).all()
    ref, _ = GMM.sample(200_000, torch.Generator().manual_seed(7))
    m, c = GMM.mean, GMM.covariance
    se_mean = np.sqrt(np.diag(c) / n)
    assert np.all(np.abs(x.mean(0).numpy() - m) < 5 * se_mean)
    xc = (x - x.mean(0)).numpy()
    cov = xc.T @ xc / (n - 1)
    rc = (ref - ref.mean(0)).numpy()
    se_cov = np.sqrt(((rc[:, :, None] * rc[:, None, :] - c) ** 2).mean(0) / n)
    assert np.all(np.abs(cov - c) < 5 * se_cov)
    # components: assign by posterior responsibility at (almost) clean data
    logits = GMM._per_component(x.numpy(), 1.0, 1e-3)[-1]
    freq = np.bincount(logits.argmax(-1), minlength=len(GMM.weights)) / n
    se = np.sqrt(GMM.weights * (1 - GMM.weights) / n)
    assert np.all(np.abs(freq - GMM.weights) < 5 * se + 0.02)  # + overlap of the components


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.schedule.kind}-{s.prediction}")
def test_every_parameterization_converts_back_to_the_same_posterior(spec):
    x = _x()
    points = POINTS
    if spec.schedule.kind == "flow":  # flow paths have alpha + sigma = 1
        points = [Point(p.alpha / (p.alpha + p.sigma), p.sigma / (p.alpha + p.sigma), 0.0) for p in POINTS]
    for p in points:
        raw = GMM.output(x, p, spec.prediction)
        cx, co = spec.x0_coeffs(p)
        ex, eo = spec.eps_coeffs(p)
        x0, eps = GMM.posterior(x, p.alpha, p.sigma)
        assert torch.allclose(cx * x + co * raw, x0, rtol=1e-12, atol=1e-12)
        assert torch.allclose(ex * x + eo * raw, eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["vp", "edm", "flow"])
def test_predictions_give_the_same_samples(kind):
    """One solver, one schedule, every parameterization: the same sample (conversions are exact algebra)."""
    # (flow + epsilon cannot start at t = 1, where alpha = 0: x0 is not recoverable from eps there)
    specs = [s for s in SPECS
             if s.schedule.kind == kind and not (kind == "flow" and s.prediction == "epsilon")]
    noise = _x(6, seed=8, scale=1.0)
    outs = []
    for spec in specs:
        prog = fs.solvers.build("euler", spec, 6)
        outs.append(fs.solvers.run_reference(prog, GMM.program_model_fn(prog), noise))
    for o in outs[1:]:
        assert torch.isfinite(o).all()
        assert torch.allclose(o, outs[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "karras"])
def test_time_keyed_model_matches_the_point_keyed_one_on_euler_grids(spacing):
    """spec_model_fn (time -> point through the spec) reproduces program_model_fn where the grid's points are
    the spec's interpolation of the time (Euler grids: fractional timesteps, linearly interpolated sigmas)."""
    spec = fs.ModelSpec(fs.schedules.DiscreteVP(), "v_prediction")
    prog = fs.solvers.build("euler", spec, 5, spacing=spacing)
    if spacing == "karras":  # sigmas come first, times are log-interpolated: the two maps differ slightly
        p = prog.calls[2].point
        assert abs(point_of_time(spec, p.model_time).sigma_tilde / p.sigma_tilde - 1) < 1e-2
        return
    noise = _x(4, seed=9, scale=1.0)
    a = fs.solvers.run_reference(prog, GMM.program_model_fn(prog), noise)
    b = fs.solvers.run_reference(prog, GMM.spec_model_fn(spec), noise)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)  # float32 sigma tables


@pytest.mark.parametrize("spec", [SPECS[3], SPECS[6]], ids=["edm", "flow"])
def test_time_keyed_model_is_exact_for_edm_and_flow(spec):
    prog = fs.solvers.build("euler", spec, 4)
    noise = _x(4, seed=10, scale=1.0)
    a = fs.solvers.run_reference(prog, GMM.program_model_fn(prog), noise)
    b = fs.solvers.run_reference(prog, GMM.spec_model_fn(spec), noise)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_program_model_fn_rejects_a_wrong_time():
    spec = SPECS[0]
    prog = fs.solvers.build("euler", spec, 3)
    fn = GMM.program_model_fn(prog)
    with pytest.raises(ValueError, match="model time"):
        fn(_x(2), prog.calls[0].time + 1.0)


def test_ode_reference_starts_from_the_prologue_and_ends_at_final():
    """Euler with many steps approaches ode_reference (so its start and end are the program's)."""
    spec = fs.ModelSpec(fs.schedules.DiscreteVP(), "epsilon")
    noise = _x(4, seed=11, scale=1.0)
    errs = [program_error(GMM, fs.solvers.build("euler", spec, n), noise) for n in (20, 80)]
    assert errs[1] < errs[0] / 3
    prog = fs.solvers.build("euler", spec, 20, final="sigma_min")
    end = end_point(spec, "sigma_min")
    assert end.sigma_tilde == pytest.approx(spec.schedule.sigma_min)
    first = prog.calls[0].point
    want = GMM.ode_solve(first.sigma * noise, first, end)  # VP Euler starts at sigma * noise (native space)
    assert torch.allclose(GMM.ode_reference(prog, noise), want, rtol=0, atol=1e-12)
    assert rms(GMM.ode_reference(prog, noise), GMM.ode_reference(prog, noise, end=end_point(spec))) > 1e-5


def test_rms_is_nan_on_nan_and_bad_inputs_are_rejected():
    a = torch.zeros(3, 3, dtype=torch.float64)
    b = a.clone()
    b[0, 0] = float("nan")
    assert math.isnan(rms(a, b))
    with pytest.raises(ValueError, match="d=3"):
        GMM.posterior(torch.zeros(2, 4), 1.0, 0.5)
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[1.0, 0.0]])
