import pytest
import torch

import fewstep as fs
from fewstep.solvers.reference import count_calls

from .harness import diffusers_sample, guided_toy_model, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")

BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras", "exponential", "beta"])
@pytest.mark.parametrize("nfe", [3, 7])
def test_euler_matches_diffusers(pred, spacing, nfe):
    cfg = dict(BASE, prediction_type=pred, steps_offset=1)
    if spacing in ("karras", "exponential", "beta"):
        cfg[f"use_{spacing}_sigmas"] = True
    else:
        cfg["timestep_spacing"] = spacing
    sch = diffusers.EulerDiscreteScheduler(**cfg)
    spec = fs.ModelSpec.from_diffusers_scheduler_config(sch.config)
    prog = fs.solvers.build("euler", spec, nfe)
    noise = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(nfe), dtype=torch.float64)
    ref, times = diffusers_sample(sch, toy_model, noise, nfe)
    fn, seen = count_calls(toy_model)
    ours = fs.solvers.run_reference(prog, fn, noise)
    assert len(seen) == prog.nfe == nfe
    assert seen == pytest.approx(times, abs=1e-3)
    # measured 5.3e-7 (float32 diffusers sigmas); 6x margin
    assert rel_err(ours, ref) <= 3e-6


def test_euler_guidance_matches_diffusers():
    sch = diffusers.EulerDiscreteScheduler(**BASE)
    spec = fs.ModelSpec.from_diffusers_scheduler_config(sch.config)
    prog = fs.solvers.build("euler", spec, 5, guidance_scale=4.0)
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    ref, _ = diffusers_sample(sch, guided_toy_model, noise, 5, guidance_scale=4.0)
    ours = fs.solvers.run_reference(prog, guided_toy_model, noise)
    # measured 3.7e-7 (float32 diffusers sigmas); 5x margin
    assert rel_err(ours, ref) <= 2e-6
