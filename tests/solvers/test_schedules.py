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


# Align Your Steps (Sabour et al. 2024), the published 10-step schedules, copied from the paper's tables: the
# timesteps SD1.5 / SDXL receive and the k-diffusion sigmas of SD1.5 / SDXL / SVD
AYS_PUBLISHED_TIMESTEPS = {
    "sd15": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24],
    "sdxl": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13],
}
AYS_PUBLISHED_SIGMAS = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.0],
}
SD = fs.ModelSpec(fs.schedules.DiscreteVP())  # SD1.5 / SDXL: scaled_linear 0.00085 .. 0.012, 1000 steps


def test_ays_tables_are_the_published_numbers():
    from diffusers.schedulers.scheduling_utils import AysSchedules

    assert {k: list(v) for k, v in S.AYS_TIMESTEPS.items()} == AYS_PUBLISHED_TIMESTEPS
    assert {k: list(v) for k, v in S.AYS_SIGMAS.items()} == AYS_PUBLISHED_SIGMAS
    assert AysSchedules["StableDiffusionTimesteps"] == AYS_PUBLISHED_TIMESTEPS["sd15"]
    assert AysSchedules["StableDiffusionXLTimesteps"] == AYS_PUBLISHED_TIMESTEPS["sdxl"]
    assert AysSchedules["StableDiffusionSigmas"] == AYS_PUBLISHED_SIGMAS["sd15"]
    assert AysSchedules["StableDiffusionXLSigmas"] == AYS_PUBLISHED_SIGMAS["sdxl"]
    assert AysSchedules["StableDiffusionVideoSigmas"] == AYS_PUBLISHED_SIGMAS["svd"]


@pytest.mark.parametrize("table", ["sd15", "sdxl"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                                    "dpmpp_2s", "unipc", "deis", "ipndm", "cm", "heun"])
def test_ays_at_its_own_step_count_visits_the_published_timesteps(solver, table):
    """The issue's case: SD1.5's ninth timestep is 124 (interpolating the sigmas and rounding gave 125)."""
    heun = solver == "heun"
    prog = fs.solvers.build(solver, SD, 19 if heun else 10, S.Spacing("ays", ays=table))
    visited = sorted(set(prog.timesteps), reverse=True)
    assert visited == [float(t) for t in AYS_PUBLISHED_TIMESTEPS[table]]
    # each call sits on the schedule's own sigma at that timestep
    sig = SD.schedule.sigmas_tilde
    assert np.allclose(sorted(set(prog.sigmas), reverse=True), sig[AYS_PUBLISHED_TIMESTEPS[table]], rtol=1e-6)


@pytest.mark.parametrize("table", ["sd15", "sdxl", "svd"])
def test_ays_at_its_own_step_count_on_edm_uses_the_published_sigmas(table):
    spec = fs.ModelSpec(fs.schedules.EDM(sigma_max=700.0 if table == "svd" else 80.0), "sample")
    prog = fs.solvers.build("euler", spec, 10, S.Spacing("ays", ays=table))
    assert list(prog.sigmas) == AYS_PUBLISHED_SIGMAS[table][:-1]


def test_ays_matches_diffusers_run_on_the_published_timesteps():
    from diffusers.schedulers.scheduling_utils import AysSchedules

    from fewstep.solvers.reference import count_calls

    from .harness import diffusers_sample, rel_err, toy_model

    ts = AysSchedules["StableDiffusionTimesteps"]
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for solver, sch in [("dpmpp_2m", diffusers.DPMSolverMultistepScheduler(**cfg)),
                        ("euler", diffusers.EulerDiscreteScheduler(**cfg))]:
        prog = fs.solvers.build(solver, SD, 10, S.Spacing("ays", ays="sd15"))
        ref, times = diffusers_sample(sch, toy_model, noise, None, set_timesteps_kwargs={"timesteps": ts})
        fn, seen = count_calls(toy_model)
        ours = fs.solvers.run_reference(prog, fn, noise)
        assert seen == times == [float(t) for t in ts]
        assert rel_err(ours, ref) <= 1e-5


def test_ays_interpolates_log_linearly_at_other_step_counts():
    s5 = S.ays_sigmas("sd15", 5)
    assert len(s5) == 6 and s5[-1] == 0 and np.all(np.diff(s5) < 0)
    assert s5[0] == pytest.approx(14.615) and s5[-2] == pytest.approx(0.152)
    # log-linear: log sigmas of the resampled schedule interpolate the table's
    s19 = S.ays_sigmas("sd15", 19)
    assert np.allclose(np.log(s19[:-1][::2]), np.log(AYS_PUBLISHED_SIGMAS["sd15"][:-1]), atol=1e-9)
    assert S.ays_timesteps("sd15", 9, 1000) is None and S.ays_timesteps("svd", 10, 1000) is None
    assert S.ays_timesteps("sd15", 10, 500) is None  # published for 1000-step schedules only


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
