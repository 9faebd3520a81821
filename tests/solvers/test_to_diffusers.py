"""Registry metadata: every solver's declared diffusers equivalent really is equivalent (fewstep accuracy and
the parity suites rely on it).  Every combination below must map and match; the only exceptions are the
documented non-equivalences in NOT_EQUIVALENT."""

import sys

import pytest
import torch

import fewstep as fs
from fewstep.solvers.diffusers_map import EQUIVALENTS

from .harness import FixedSDE3Scheduler, diffusers_sample, rel_err, toy_model

pytest.importorskip("diffusers")

VP = fs.ModelSpec(fs.schedules.DiscreteVP(), "epsilon")
VPV = fs.ModelSpec(
    fs.schedules.DiscreteVP(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), "v_prediction"
)
FLOW = fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow")

# options that select the equivalent where the solver's defaults are not diffusers' behaviour
OPTIONS = {
    "deis": {"final": "sigma_min"},  # DEISMultistepScheduler always ends at sigma_min
    "ipndm": {"grid": "ipndm"},  # IPNDMScheduler has its own grid
}
NOT_EQUIVALENT = {
    ("ipndm", "vp-eps"): "IPNDMScheduler reads the network output as v: an epsilon spec has no equivalent",
    ("cm", "vp-eps"): "CMStochasticIterativeScheduler works on EDM sigmas and applies the consistency "
                      "parameterization (c_skip, c_out, c_noise = 250 log sigma) in step(); fewstep takes "
                      "that as the adapter's sample prediction (both compared in test_consistency_parity.py)",
}
NOT_EQUIVALENT[("cm", "vp-v")] = NOT_EQUIVALENT[("cm", "vp-eps")]


def _steps(name: str, nfe: int) -> int:
    """diffusers' num_inference_steps for a given NFE."""
    return (nfe + 1) // 2 if name in ("heun", "flow_heun") else nfe


def _cases():
    for name in fs.solvers.available():
        if name not in EQUIVALENTS:
            continue
        specs = [("flow", FLOW)] if name.startswith("flow_") else [("vp-eps", VP), ("vp-v", VPV)]
        if name in ("dpmpp_2m", "dpmpp_3m", "unipc"):
            specs.append(("flow", FLOW))
        for label, spec in specs:
            why = NOT_EQUIVALENT.get((name, label))
            marks = [pytest.mark.skip(reason=why)] if why else []
            yield pytest.param(name, spec, id=f"{name}-{label}", marks=marks)


@pytest.mark.parametrize("name,spec", list(_cases()))
def test_declared_equivalent_matches(monkeypatch, name, spec):
    opts = OPTIONS.get(name, {})
    sch = fs.solvers.to_diffusers(name, spec, **opts)
    assert type(sch).__name__ == EQUIVALENTS[name].scheduler
    if name == "dpmpp_3m_sde":  # diffusers' third-order SDE weight is wrong (README): its corrected form
        sch = FixedSDE3Scheduler.from_config(sch.config)
    nfe = 5
    prog = fs.solvers.build(name, spec, nfe, **opts)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    zs = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(nfe)] \
        if prog.stochastic else None
    step_noise = zs
    if zs is not None and "variance_noise" not in sch.step.__code__.co_varnames:
        # the scheduler draws its own noise in step(): hand it ours, in order
        it = iter(zs)
        monkeypatch.setattr(sys.modules[type(sch).__module__], "randn_tensor",
                            lambda shape, **kw: next(it).to(kw.get("dtype") or torch.float64))
        step_noise = None
    ref, _ = diffusers_sample(sch, toy_model, noise, _steps(name, nfe), step_noise=step_noise)
    ours = fs.solvers.run_reference(prog, toy_model, noise, step_noise=zs)
    # measured <= 5.9e-7 (float32 diffusers tables), except heun-vp-v at 7.2e-6; 4-5x margins
    assert rel_err(ours, ref) <= (3e-5 if name == "heun" else 3e-6)


@pytest.mark.parametrize("name,spec,spacing,opts,match", [
    ("euler", VP, "ays", {}, "no config for spacing 'ays'"),
    ("ipndm", fs.ModelSpec(fs.schedules.DiscreteVP(rescale_zero_terminal_snr=True), "v_prediction"),
     "linspace", {"grid": "ipndm"}, "takes no"),
    ("heun", VP, None, {"final": "sigma_min"}, "HeunDiscreteScheduler always ends at sigma = 0"),
    ("flow_euler", FLOW, None, {"final": "sigma_min"}, "always ends at sigma = 0"),
    ("tcd", VP, None, {"final": "zero"}, "final must be 'sigma_min'"),
    ("euler", VP, None, {"final": "sigma_min"}, "x / alpha"),
    ("deis", VP, "karras", {"final": "sigma_min"}, "wastes its last call"),
    ("deis", VP, None, {}, "always ends at sigma_min"),
    ("dpmpp_3m", VP, None, {"taylor_d2": True}, "taylor_d2 has no diffusers equivalent"),
    ("cm", VP, None, {}, "train_steps=N, gamma=1 and final='sigma_min'"),
])
def test_settings_a_class_cannot_take_are_an_error_not_silently_dropped(name, spec, spacing, opts, match):
    with pytest.raises(ValueError, match=match):
        fs.solvers.to_diffusers(name, spec, spacing, **opts)


def test_to_diffusers_resolves_like_build():
    """Without explicit arguments both read the spec's diffusers config the same way."""
    diffusers = pytest.importorskip("diffusers")
    spec = fs.ModelSpec.from_diffusers_scheduler_config(diffusers.DEISMultistepScheduler(
        solver_order=3, timestep_spacing="trailing").config)
    sch = fs.solvers.to_diffusers("deis", spec)
    assert (sch.config.solver_order, sch.config.timestep_spacing) == (3, "trailing")
    prog = fs.solvers.build("deis", spec, 4)
    assert (prog.options["order"], prog.options["final"]) == (3, "sigma_min")
    assert prog.options["spacing"] == "trailing"
