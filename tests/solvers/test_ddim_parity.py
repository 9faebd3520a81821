"""DDIM against diffusers' DDIMScheduler: its own grid (prev_timestep = t - T // n), set_alpha_to_one, eta."""

import pytest
import torch

import fewstep as fs
from fewstep.solvers.grids import ddim_timesteps
from fewstep.solvers.spacing import Spacing

from .harness import assert_matches_diffusers, guided_toy_model, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")

VP = fs.schedules.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SPACINGS = [Spacing("linspace"), Spacing("leading"), Spacing("leading", steps_offset=1), Spacing("trailing")]


def _check(spec, nfe, spacing, *, guidance=None, eta=0.0, final="zero", seed=0):
    sch = fs.solvers.to_diffusers("ddim", spec, spacing, eta=eta, final=final)
    step = sch.step
    sch.step = lambda *a, **k: step(*a, eta=eta, **k)  # DDIMScheduler takes eta per step, not in its config
    prog = fs.solvers.build("ddim", spec, nfe, spacing, guidance_scale=guidance, eta=eta, final=final)
    g = torch.Generator().manual_seed(100 * nfe + seed)
    noise = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    step_noise = None
    if eta:
        step_noise = [torch.randn(noise.shape, generator=g, dtype=torch.float64) for _ in range(nfe)]
    model = guided_toy_model if guidance is not None else toy_model
    assert prog.nfe == nfe
    # measured 3.7e-6 over the grid below (float32 alphas_cumprod in diffusers); 2.7x margin
    assert_matches_diffusers(sch, prog, model, noise, nfe, guidance_scale=guidance, step_noise=step_noise,
                             rtol=1e-5, time_atol=1e-9,
                             what=f"ddim {spacing.name} nfe={nfe} eta={eta} final={final}")
    return prog


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: f"{s.name}{s.steps_offset}")
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_ddim_matches_diffusers(pred, spacing, eta, final):
    spec = fs.ModelSpec(VP, pred)
    for nfe in (1, 2, 3, 5, 7, 8):
        prog = _check(spec, nfe, spacing, eta=eta, final=final)
        assert prog.stochastic == (eta > 0) or nfe == 1  # one step may end where std = 0 (at alpha_bar = 1)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("nfe", [1, 4, 6])
def test_ddim_guidance_matches_diffusers(eta, nfe):
    _check(fs.ModelSpec(VP, "v_prediction"), nfe, Spacing("trailing"), guidance=5.0, eta=eta)


ZSNR = fs.schedules.DiscreteVP(beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True)


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
@pytest.mark.parametrize("spacing", SPACINGS[1:], ids=lambda s: s.name)
def test_ddim_zero_snr_matches_diffusers(pred, spacing):
    """DDIMScheduler keeps alpha_bar(T-1) = 0 (no 2**-24 clamp): trailing grids start at exactly zero SNR."""
    for nfe in (1, 4, 10):
        _check(fs.ModelSpec(ZSNR, pred), nfe, spacing, eta=0.3)


def test_ddim_zero_snr_epsilon_raises():
    """diffusers returns inf here (x0 = (x - eps) / 0); we refuse at build time."""
    with pytest.raises(ValueError, match="zero-SNR"):
        fs.solvers.build("ddim", fs.ModelSpec(ZSNR, "epsilon"), 4, "trailing")
    fs.solvers.build("ddim", fs.ModelSpec(ZSNR, "epsilon"), 4, "leading")  # never visits T - 1: fine


def test_ddim_grid_quirks():
    # prev_timestep = t - T // n is not the next grid timestep: trailing n=7 stops at timestep 0, not the end
    ts = ddim_timesteps(1000, 7, Spacing("trailing"))
    assert ts[-1] - 1000 // 7 == 0
    prog = fs.solvers.build("ddim", fs.ModelSpec(VP), 7, "trailing")
    last = prog.stages[-1].info
    assert last["t_prev"] == 0
    assert list(ddim_timesteps(1000, 3, Spacing("linspace"))) == [999, 500, 0]
    assert list(ddim_timesteps(1000, 4, Spacing("leading", steps_offset=1))) == [751, 501, 251, 1]


def test_ddim_is_first_order_dpm_on_its_own_steps():
    """eta = 0 DDIM is DPM-Solver++(1): same update where the grids agree (trailing, T divisible by n)."""
    spec = fs.ModelSpec(VP, "epsilon")
    a = fs.solvers.build("ddim", spec, 4, "trailing")
    b = fs.solvers.build("dpmpp_2m", spec, 4, "trailing", order=1)
    assert a.timesteps == b.timesteps
    x = torch.randn(2, 11, dtype=torch.float64)
    xa, xb = fs.solvers.run_reference(a, toy_model, x), fs.solvers.run_reference(b, toy_model, x)
    assert rel_err(xa, xb) < 1e-6


@pytest.mark.parametrize("kwargs,match", [
    (dict(eta=-0.1), "eta"),
    (dict(eta=float("nan")), "eta"),
    (dict(spacing="karras"), "spacings"),
    (dict(spacing=Spacing("leading", steps_offset=300), nfe=4), "outside|expected"),
    (dict(nfe=1001), "largest valid nfe is 1000"),
    (dict(final="one"), "final"),
])
def test_ddim_bad_input_raises(kwargs, match):
    kwargs = dict(kwargs)
    nfe = kwargs.pop("nfe", 4)
    spacing = kwargs.pop("spacing", "leading")
    with pytest.raises(ValueError, match=match):
        fs.solvers.build("ddim", fs.ModelSpec(VP), nfe, spacing, **kwargs)


@pytest.mark.parametrize("schedule,pred", [(fs.schedules.EDM(), "epsilon"), (fs.schedules.Flow(), "flow")])
def test_ddim_needs_vp_schedule(schedule, pred):
    with pytest.raises(ValueError, match="DiscreteVP"):
        fs.solvers.build("ddim", fs.ModelSpec(schedule, pred), 4, "karras" if pred == "epsilon" else "flow")


def test_ddim_registry_metadata():
    info = fs.solvers.get("ddim")
    assert not info.is_stochastic(info.options()) and info.is_stochastic(info.options(eta=0.5))
    assert info.nominal_order(info.options()) == 1 and info.nominal_order(info.options(eta=1.0)) is None
    sch = fs.solvers.to_diffusers("ddim", fs.ModelSpec(VP), "trailing", final="sigma_min")
    assert not sch.config.set_alpha_to_one and not sch.config.clip_sample
