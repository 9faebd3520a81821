"""Schedules, specs and spacings against diffusers' own tables and helpers."""

import math

import numpy as np
import pytest
import torch

import fewstep as fs
from fewstep.solvers import spacing as S

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zsnr", [False, True])
def test_alphas_cumprod_match_diffusers(beta_schedule, zsnr):
    cfg = dict(beta_schedule=beta_schedule, rescale_betas_zero_snr=zsnr, beta_start=0.00085, beta_end=0.012)
    d = diffusers.DDIMScheduler(**cfg)
    spec = fs.ModelSpec.from_diffusers_scheduler_config(d.config)
    assert np.array_equal(spec.schedule.alphas_cumprod_exact, d.alphas_cumprod.double().numpy())
    guarded = diffusers.DPMSolverMultistepScheduler(**cfg).alphas_cumprod.double().numpy()
    assert np.array_equal(spec.schedule.alphas_cumprod, guarded)
    assert np.isfinite(spec.schedule.sigmas_tilde).all()


def test_points_are_consistent():
    vp = fs.schedules.DiscreteVP()
    for t in (0, 1.5, 500, 999):
        p = vp.point_at_timestep(t)
        assert p.alpha**2 + p.sigma**2 == pytest.approx(1.0)
        # exact inverse at table points; between them sigma is interpolated linearly but inverted in log-sigma
        # (both as diffusers does), so a fractional t comes back only approximately
        assert vp.timestep_of_sigma(p.sigma_tilde) == pytest.approx(t, abs=1e-9 if t == int(t) else 0.05)
        assert p.lam == pytest.approx(math.log(p.alpha / p.sigma))
    fl = fs.schedules.Flow(shift=3.0)
    assert fl.shift_t(0.5) == pytest.approx(0.75)
    assert fs.schedules.Flow(mu=0.0).shift_t(0.3) == pytest.approx(0.3)
    p = fl.point_at_t(0.25)
    assert (p.alpha, p.sigma, p.model_time) == (0.75, 0.25, 250.0)


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_conversions_invert_the_forward_process(pred):
    spec = fs.ModelSpec(fs.schedules.DiscreteVP(), pred)
    p = spec.schedule.point_at_timestep(321)
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(10, generator=g, dtype=torch.float64),
        torch.randn(10, generator=g, dtype=torch.float64),
    )
    x = p.alpha * x0 + p.sigma * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": p.alpha * eps - p.sigma * x0}[pred]
    cx, co = spec.x0_coeffs(p)
    ex, eo = spec.eps_coeffs(p)
    assert torch.allclose(cx * x + co * out, x0) and torch.allclose(ex * x + eo * out, eps)


def test_flow_conversion():
    spec = fs.ModelSpec(fs.schedules.Flow(), "flow")
    p = spec.schedule.point_at_t(0.3)
    x0, eps = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    x, v = p.alpha * x0 + p.sigma * eps, eps - x0
    cx, co = spec.x0_coeffs(p)
    ex, eo = spec.eps_coeffs(p)
    assert torch.allclose(cx * x + co * v, x0) and torch.allclose(ex * x + eo * v, eps)


def test_sigma_spacings_match_diffusers_helpers():
    sch = diffusers.EulerDiscreteScheduler()
    sig = torch.tensor([14.6, 0.03])
    for n in (3, 8):
        ref_k = sch._convert_to_karras(in_sigmas=sig, num_inference_steps=n)
        assert np.allclose(S.karras_sigmas(0.03, 14.6, n, 7.0), ref_k, rtol=1e-6)
        ref_e = sch._convert_to_exponential(in_sigmas=sig, num_inference_steps=n)
        assert np.allclose(S.exponential_sigmas(0.03, 14.6, n), ref_e, rtol=1e-6)
        ref_b = sch._convert_to_beta(in_sigmas=sig, num_inference_steps=n)
        assert np.allclose(S.beta_sigmas(0.03, 14.6, n), ref_b, rtol=1e-6)


def test_ays_tables_and_loglinear_interpolation():
    from diffusers.schedulers.scheduling_utils import AysSchedules

    assert np.allclose(S.ays_sigmas("sd15", 10), AysSchedules["StableDiffusionSigmas"])
    assert np.allclose(S.ays_sigmas("sdxl", 10), AysSchedules["StableDiffusionXLSigmas"])
    s5 = S.ays_sigmas("sd15", 5)
    assert len(s5) == 6 and s5[-1] == 0 and np.all(np.diff(s5) < 0)
    assert s5[0] == pytest.approx(14.615) and s5[-2] == pytest.approx(0.152)
    # log-linear: log sigmas of the resampled schedule interpolate the table's
    s19 = S.ays_sigmas("sd15", 19)
    assert np.allclose(np.log(s19[:-1][::2]), np.log(AysSchedules["StableDiffusionSigmas"][:-1]), atol=1e-9)


@pytest.mark.parametrize(
    "name",
    [
        "DDIMScheduler",
        "EulerDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "EDMEulerScheduler",
    ],
)
def test_spec_from_any_diffusers_config(name):
    sch = getattr(diffusers, name)()
    spec = fs.ModelSpec.from_diffusers_scheduler_config(sch.config)
    kind = {"FlowMatchEulerDiscreteScheduler": "flow", "EDMEulerScheduler": "edm"}.get(name, "vp")
    assert spec.schedule.kind == kind
    if kind == "vp":
        assert spec.prediction == sch.config.prediction_type


def test_spec_rejects_non_mapping():
    with pytest.raises(TypeError, match="mapping"):
        fs.ModelSpec.from_diffusers_scheduler_config(["not", "a", "config"])
