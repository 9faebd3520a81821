"""A spec read from a diffusers scheduler's config, built with the solver that is that scheduler and no
options, reproduces that scheduler (to the parity tolerance of harness.assert_matches_diffusers).

The oracle is diffusers itself: the scheduler the config came from, run through its own loop.  LCM, TCD and
consistency models draw noise inside step() and are checked the same way in test_consistency_parity.py."""

import json

import pytest
import torch

import fewstep as fs

from .harness import FixedSDE3Scheduler, assert_matches_diffusers, diffusers_sample, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")

NFE = 5

# the scheduler (with the settings that make it that solver) each solver reproduces from its config
SCHEDULERS = {
    "ddim": lambda **kw: diffusers.DDIMScheduler(clip_sample=False, **kw),  # clip_sample clamps: not linear
    "deis": diffusers.DEISMultistepScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "dpmpp_3m": lambda **kw: diffusers.DPMSolverMultistepScheduler(solver_order=3, **kw),
    "dpmpp_2m_sde": lambda **kw: diffusers.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", **kw),
    "dpmpp_3m_sde": lambda **kw: diffusers.DPMSolverMultistepScheduler(
        solver_order=3, algorithm_type="sde-dpmsolver++", **kw),
    "dpmpp_2s": diffusers.DPMSolverSinglestepScheduler,
    "unipc": diffusers.UniPCMultistepScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "heun": diffusers.HeunDiscreteScheduler,
    "ipndm": diffusers.IPNDMScheduler,
    "flow_euler": diffusers.FlowMatchEulerDiscreteScheduler,
    "flow_heun": diffusers.FlowMatchHeunDiscreteScheduler,
}

# settings each scheduler's config carries that fewstep must pick up as defaults (not just the defaults)
VARIANTS = {
    "ddim": [dict(set_alpha_to_one=False, steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012), dict(timestep_spacing="trailing", prediction_type="v_prediction")],
    "deis": [dict(solver_order=3), dict(lower_order_final=False, timestep_spacing="trailing")],
    "dpmpp_2m": [dict(final_sigmas_type="sigma_min", solver_type="heun"),
                 dict(euler_at_final=True, lower_order_final=False, use_karras_sigmas=True)],
    "dpmpp_2s": [dict(final_sigmas_type="sigma_min", solver_type="heun")],
    # (diffusers' UniPC is NaN with predict_x0=False or lower_order_final=False into sigma = 0: README)
    "unipc": [dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
              dict(predict_x0=False, disable_corrector=[0, 2], final_sigmas_type="sigma_min"),
              dict(lower_order_final=False, final_sigmas_type="sigma_min")],
    "euler": [dict(timestep_spacing="trailing", prediction_type="v_prediction")],
    "flow_euler": [dict(shift=3.0)],
}


def _steps(name: str, nfe: int) -> int:
    return (nfe + 1) // 2 if name in ("heun", "flow_heun") else nfe


def _reference(name: str, sch):
    """dpmpp_3m_sde: diffusers' third-order SDE weight is wrong (README, diffusers bugs); compare with the
    corrected scheduler, as test_dpm_parity.py does."""
    return FixedSDE3Scheduler.from_config(sch.config) if name == "dpmpp_3m_sde" else sch


def _check(name, sch, spec, what):
    prog = fs.solvers.build(name, spec, NFE)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    zs = [torch.randn(noise.shape, generator=g, dtype=torch.float64) for _ in range(NFE)] \
        if prog.stochastic else None
    # measured 3.7e-7 (dpmpp_2m; float32 diffusers tables); 5x margin
    assert_matches_diffusers(_reference(name, sch), prog, toy_model, noise, _steps(name, NFE), step_noise=zs,
                             rtol=2e-6, what=what)


def _cases():
    for name in SCHEDULERS:
        yield pytest.param(name, {}, id=f"{name}-default")
        for i, kw in enumerate(VARIANTS.get(name, [])):
            yield pytest.param(name, kw, id=f"{name}-variant{i}")


@pytest.mark.parametrize("name,kw", list(_cases()))
def test_in_memory_config_reproduces_its_scheduler(name, kw):
    """``scheduler.config`` (no _class_name: the class is recognised by its keys) -> spec -> build(name)."""
    sch = SCHEDULERS[name](**kw)
    spec = fs.ModelSpec.from_diffusers_scheduler_config(sch.config)
    assert spec.config_from(type(sch).__name__)
    _check(name, sch, spec, f"{name} {kw}")


@pytest.mark.parametrize("name,kw", list(_cases()))
def test_saved_config_reproduces_its_scheduler(name, kw):
    """The scheduler_config.json form (with _class_name), and the scheduler object itself."""
    sch = SCHEDULERS[name](**kw)
    saved = json.loads(sch.to_json_string())
    assert saved["_class_name"] == type(sch).__name__
    _check(name, sch, fs.ModelSpec.from_diffusers_scheduler_config(saved), f"{name} {kw} (saved)")
    obj_spec = fs.ModelSpec.from_diffusers_scheduler_config(sch)
    _check(name, SCHEDULERS[name](**kw), obj_spec, f"{name} {kw} (object)")


def test_deis_default_config_no_longer_ends_at_zero():
    """The issue's case: DEIS ends at sigma_min, and fewstep's deis used to end at zero (2.7e-2 apart)."""
    sch = diffusers.DEISMultistepScheduler()
    spec = fs.ModelSpec.from_diffusers_scheduler_config(sch.config)
    prog = fs.solvers.build("deis", spec, NFE)
    assert prog.options["final"] == "sigma_min"
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, _ = diffusers_sample(sch, toy_model, noise, NFE)
    assert rel_err(fs.solvers.run_reference(prog, toy_model, noise), ref) <= 1e-5
    # fewstep's own end at sigma = 0 stays an option, and is not diffusers'
    zero = fs.solvers.build("deis", spec, NFE, final="zero")
    assert rel_err(fs.solvers.run_reference(zero, toy_model, noise), ref) > 1e-3


def test_explicit_options_and_spacing_win_over_the_config():
    spec = fs.ModelSpec.from_diffusers_scheduler_config(diffusers.UniPCMultistepScheduler(
        solver_order=3, final_sigmas_type="sigma_min").config)
    prog = fs.solvers.build("unipc", spec, 6, "karras", order=1, final="zero")
    assert (prog.options["order"], prog.options["final"], prog.options["spacing"]) == (1, "zero", "karras")
    assert fs.solvers.build("unipc", spec, 6).options["order"] == 3


def test_another_schedulers_config_sets_no_solver_options():
    """Only the spacing flags of a config apply to every solver; its scheduler's own settings apply only to
    the solver that is that scheduler."""
    spec = fs.ModelSpec.from_diffusers_scheduler_config(diffusers.DPMSolverMultistepScheduler(
        final_sigmas_type="sigma_min", solver_order=3, use_karras_sigmas=True).config)
    uni = fs.solvers.build("unipc", spec, 6)
    assert (uni.options["final"], uni.options["order"], uni.options["spacing"]) == ("zero", 2, "karras")
    # the solver's name fixes its algorithm: dpmpp_2m stays second order on a solver_order=3 config
    dpm = fs.solvers.build("dpmpp_2m", spec, 6)
    assert (dpm.options["order"], dpm.options["final"]) == (2, "sigma_min")


def test_a_config_default_that_does_not_fit_names_where_it_came_from():
    spec = fs.ModelSpec.from_diffusers_scheduler_config(diffusers.IPNDMScheduler().config)
    with pytest.raises(ValueError, match=r"final must be 'zero' \(with \{'grid': 'ipndm'\} taken from the "
                                         r"spec's diffusers config; pass the option to override it\)"):
        fs.solvers.build("ipndm", spec, 4, final="sigma_min")
    assert fs.solvers.build("ipndm", spec, 4, final="sigma_min", grid="spacing").options["grid"] == "spacing"


def test_euler_to_sigma_min_differs_from_diffusers_only_by_its_output_scaling():
    """A documented non-equivalence: EulerDiscreteScheduler steps in k-diffusion variables and returns them,
    so with final_sigmas_type='sigma_min' its sample is x / alpha at sigma_min; fewstep returns x (the
    schedule's own space, as DPMSolverMultistep / UniPC do).  The config's final sigma is still taken, so the
    two agree up to that factor, 1 / alpha_min = sqrt(1 + sigma_min^2)."""
    sch = diffusers.EulerDiscreteScheduler(final_sigmas_type="sigma_min")
    spec = fs.ModelSpec.from_diffusers_scheduler_config(sch.config)
    prog = fs.solvers.build("euler", spec, NFE)
    assert prog.options["final"] == "sigma_min"
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, _ = diffusers_sample(sch, toy_model, noise, NFE)
    ours = fs.solvers.run_reference(prog, toy_model, noise)
    sigma_min = spec.schedule.sigma_min
    assert rel_err(ours * (1 + sigma_min**2) ** 0.5, ref) <= 1e-5
    assert rel_err(ours, ref) > 1e-5
    with pytest.raises(ValueError, match="x / alpha"):
        fs.solvers.to_diffusers("euler", spec)
