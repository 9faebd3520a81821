import math

import pytest
import torch

import fewstep as fs
from fewstep.solvers.reference import count_calls

from .harness import diffusers_sample, guided_toy_model, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")

VP = fs.schedules.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
AB = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -4 / 3, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -3 / 8]}


def _noise(seed: int, shape=(2, 3, 4, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _as_v(sample_model):
    """A sample-prediction network as the v-prediction one IPNDMScheduler expects (alpha = cos(pi t / 2))."""

    def v_model(x, t):
        a, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
        return (a * x - sample_model(x, t)) / s

    return v_model


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
@pytest.mark.parametrize("nfe", [2, 3, 4, 5, 9])
def test_ipndm_grid_matches_diffusers(pred, nfe):
    spec = fs.ModelSpec(VP, pred)
    sch = fs.solvers.to_diffusers("ipndm", spec, grid="ipndm")
    v_model = toy_model if pred == "v_prediction" else _as_v(toy_model)
    ref, times = diffusers_sample(sch, v_model, _noise(nfe), nfe)
    prog = fs.solvers.build("ipndm", spec, nfe, grid="ipndm")
    fn, seen = count_calls(toy_model)
    ours = fs.solvers.run_reference(prog, fn, _noise(nfe))
    assert len(seen) == prog.nfe == nfe == len(times)
    assert seen == pytest.approx(times, abs=1e-6)
    # measured 2.4e-6 (float32 diffusers sigmas, nfe 9); 4x margin
    assert rel_err(ours, ref) <= 1e-5


def test_ipndm_grid_guidance_matches_diffusers():
    spec = fs.ModelSpec(VP, "v_prediction")
    sch = fs.solvers.to_diffusers("ipndm", spec, grid="ipndm")
    ref, _ = diffusers_sample(sch, guided_toy_model, _noise(6), 6, guidance_scale=5.0)
    prog = fs.solvers.build("ipndm", spec, 6, grid="ipndm", guidance_scale=5.0)
    # measured 1.6e-7 (float32 diffusers sigmas); 6x margin
    assert rel_err(fs.solvers.run_reference(prog, guided_toy_model, _noise(6)), ref) <= 1e-6


def _kdiffusion_ipndm(spec, grid, model, noise, order):
    """k-diffusion's sample_ipndm, written independently of the IR: Euler steps on x / alpha with the
    derivative d = (x / alpha - x0) / sigma_tilde extrapolated by Adams-Bashforth weights."""
    pts = grid.points
    xk = noise / pts[0].alpha  # VP multistep grids start at x = noise
    buf = []
    for p, q in zip(pts[:-1], pts[1:]):
        x = xk * p.alpha
        out = model(x, p.model_time)
        a, s = p.alpha, p.sigma
        x0 = {"epsilon": (x - s * out) / a, "v_prediction": a * x - s * out, "sample": out}[spec.prediction]
        buf.insert(0, (xk - x0) / p.sigma_tilde)
        k = min(order, len(buf))
        xk = xk + (q.sigma_tilde - p.sigma_tilde) * sum(w * d for w, d in zip(AB[k], buf))
    return xk * pts[-1].alpha


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing", "karras"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("nfe", [1, 3, 6])
def test_ipndm_matches_kdiffusion_loop(pred, spacing, order, nfe):
    spec = fs.ModelSpec(VP, pred)
    grid = fs.solvers.make_grid(spec, fs.solvers.Spacing(spacing), nfe, family="multistep")
    ref = _kdiffusion_ipndm(spec, grid, toy_model, _noise(nfe), order)
    prog = fs.solvers.build("ipndm", spec, nfe, spacing, order=order)
    fn, seen = count_calls(toy_model)
    ours = fs.solvers.run_reference(prog, fn, _noise(nfe))
    assert len(seen) == prog.nfe == nfe
    assert seen == pytest.approx([p.model_time for p in grid.points[:-1]])
    # measured 9.3e-15 (float64 on both sides); 11x margin
    assert rel_err(ours, ref) <= 1e-13


@pytest.mark.parametrize("spec, spacing", [(fs.ModelSpec(VP, "epsilon"), "karras"),
                                           (fs.ModelSpec(fs.schedules.EDM(), "epsilon"), "exponential")])
def test_ipndm_sigma_min_end_is_not_repeated(spec, spacing):
    """A sigma spacing already ends at sigma_min; final='sigma_min' must not append it again (a step that goes
    nowhere would waste the last call)."""
    prog = fs.solvers.build("ipndm", spec, 5, spacing, final="sigma_min")
    assert prog.nfe == 5
    assert all(a > b for a, b in zip(prog.sigmas, prog.sigmas[1:]))
    assert "O_c" in prog.stages[-1].rows()["x"]
    smin = spec.schedule.sigma_min
    x = fs.solvers.run_reference(prog, toy_model, _noise(5))
    assert torch.isfinite(x).all()
    assert prog.sigmas[-1] > smin * (1 + 1e-6)


def test_ipndm_lower_order_final():
    spec = fs.ModelSpec(VP, "epsilon")
    prog = fs.solvers.build("ipndm", spec, 6, lower_order_final=True)
    assert [s.info["order"] for s in prog.stages[1:]] == [1, 2, 3, 3, 2, 1]
    prog = fs.solvers.build("ipndm", spec, 6, euler_at_final=True)
    assert [s.info["order"] for s in prog.stages[1:]] == [1, 2, 3, 4, 4, 1]


@pytest.mark.parametrize("spec, spacing", [
    (fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow"), "flow"),
    (fs.ModelSpec(fs.schedules.EDM(), "epsilon"), "karras"),
    (fs.ModelSpec(fs.schedules.EDM(), "v_prediction"), "exponential"),
], ids=["flow", "edm-eps", "edm-v"])
def test_ipndm_order1_is_euler(spec, spacing):
    """iPNDM-1 is DDIM = Euler in (x / alpha, sigma / alpha): the same as the (diffusers-tested) euler solver,
    including the flow grid's pure-noise start at t = 1, where x0 comes from the network."""
    a = fs.solvers.run_reference(fs.solvers.build("ipndm", spec, 5, spacing, order=1), toy_model, _noise(2))
    b = fs.solvers.run_reference(fs.solvers.build("euler", spec, 5, spacing), toy_model, _noise(2))
    assert rel_err(a, b) <= 1e-12
    c = fs.solvers.run_reference(fs.solvers.build("ipndm", spec, 5, spacing), toy_model, _noise(2))
    assert torch.isfinite(c).all() and rel_err(c, b) > 1e-6


@pytest.mark.parametrize("bad", [dict(order=5), dict(order=0), dict(grid="cosine"), dict(final="x"),
                                 dict(grid="ipndm", final="sigma_min"), dict(stepz=3)])
def test_ipndm_bad_options_raise(bad):
    with pytest.raises(ValueError):
        fs.solvers.build("ipndm", fs.ModelSpec(VP, "v_prediction"), 4, **bad)


@pytest.mark.parametrize("spec, nfe", [(fs.ModelSpec(VP, "epsilon"), 4),
                                       (fs.ModelSpec(VP, "v_prediction"), 1),
                                       (fs.ModelSpec(fs.schedules.EDM(), "v_prediction"), 4)])
def test_ipndm_grid_unusable_combinations_raise(spec, nfe):
    with pytest.raises(ValueError):
        fs.solvers.build("ipndm", spec, nfe, grid="ipndm")


def test_ipndm_default_grid_has_no_diffusers_equivalent():
    with pytest.raises(ValueError, match="grid='ipndm'"):
        fs.solvers.to_diffusers("ipndm", fs.ModelSpec(VP, "v_prediction"))
    with pytest.raises(ValueError):
        fs.solvers.to_diffusers("ipndm", fs.ModelSpec(VP, "v_prediction"), grid="ipndm", order=3)
