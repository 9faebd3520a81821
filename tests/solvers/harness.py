"""Shared test machinery for solver parity: a smooth toy network and diffusers' own sampling loop."""

from __future__ import annotations

import math

import pytest
import torch

T_SCALE = 1000.0


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth, nonlinear, time-dependent stand-in network (float64 in, same dtype out).

    Mixes neighbouring elements so a solver that mixes up registers or batch halves cannot pass by accident.
    """
    t = float(t)
    s = t / T_SCALE
    mix = torch.roll(x, shifts=1, dims=-1)
    return 0.7 * torch.tanh(x * (0.5 + s)) + 0.2 * math.cos(3 * s) * mix + 0.1 * s * x


def guided_toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """With guidance the batch is [uncond; cond]: make the halves differ."""
    out = toy_model(x, t)
    half = x.shape[0] // 2
    out[half:] = out[half:] + 0.3 * torch.sin(x[half:])
    return out


def diffusers_sample(scheduler, model_fn, noise: torch.Tensor, nfe_steps: int, *, guidance_scale=None,
                     step_noise=None, set_timesteps_kwargs=None) -> tuple[torch.Tensor, list[float]]:
    """diffusers' own loop (as in its pipelines): scale_model_input, model, guidance, step.

    Returns the sample and the list of time inputs the model saw.  ``step_noise`` (list) is fed to the
    scheduler as its per-step noise via a generator-free hook where the scheduler supports it.
    """
    scheduler.set_timesteps(nfe_steps, **(set_timesteps_kwargs or {}))
    x = noise.double() * getattr(scheduler, "init_noise_sigma", 1.0)
    times = []
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        if guidance_scale is not None:
            out = model_fn(torch.cat([inp, inp]), float(t))
            u, c = out.chunk(2)
            out = u + guidance_scale * (c - u)
        else:
            out = model_fn(inp, float(t))
        times.append(float(t))
        kwargs = {}
        if step_noise is not None:
            kwargs["variance_noise"] = step_noise[len(times) - 1]
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x, times


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/Inf in a sample"
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_matches_diffusers(scheduler, prog, model_fn, noise: torch.Tensor, steps: int, *, rtol: float,
                             guidance_scale=None, step_noise=None, time_atol: float = 1e-3,
                             what: str = "") -> None:
    """diffusers' loop and ``run_reference`` on the same model and noise: the same network calls at the same
    time inputs (``len == prog.nfe``), and samples equal to relative error ``rtol`` (each caller sets it from
    the error it measured: float64 tables agree to ~1e-14, diffusers' float32 tables to ~1e-7..4e-6)."""
    ref, times = diffusers_sample(scheduler, model_fn, noise, steps, guidance_scale=guidance_scale,
                                  step_noise=step_noise)
    from fewstep.solvers.reference import count_calls, run_reference

    fn, seen = count_calls(model_fn)
    ours = run_reference(prog, fn, noise, step_noise=step_noise)
    assert len(seen) == prog.nfe == len(times)
    assert seen == pytest.approx(times, abs=time_atol), (seen, times)
    err = rel_err(ours, ref)
    assert err <= rtol, f"{what}: rel err {err:.3g} > {rtol:g}"


try:
    from diffusers import DPMSolverMultistepScheduler
except ImportError:  # pragma: no cover - diffusers is a test dependency; the parity suites skip without it
    DPMSolverMultistepScheduler = object


class FixedSDE3Scheduler(DPMSolverMultistepScheduler):
    """diffusers' multistep scheduler with the third-order sde-dpmsolver++ D2 weight corrected from
    ``(1 - e^-2h - 2h) / (2h)^2 - 0.5`` to ``... + 0.5`` (k-diffusion's sample_dpmpp_3m_sde, the 2h
    analogue of the ODE weight; diffusers' tends to -1 as h -> 0): the update is diffusers' + alpha_t D2."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **k):
        x = super().multistep_dpm_solver_third_order_update(
            model_output_list, *args, sample=sample, noise=noise, **k)
        if self.config.algorithm_type != "sde-dpmsolver++":
            return x
        i = self.step_index
        lam = []
        for s in (self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1], self.sigmas[i - 2]):
            a, sg = self._sigma_to_alpha_sigma_t(s)
            lam.append((torch.log(a) - torch.log(sg), a))
        (lt, alpha_t), (l0, _), (l1, _), (l2, _) = lam
        r0, r1 = (l0 - l1) / (lt - l0), (l1 - l2) / (lt - l0)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        return x + alpha_t * d2
