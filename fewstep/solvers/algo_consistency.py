"""Consistency-style samplers: LCM, TCD and consistency-model multistep / CTM gamma-sampling.

Each step asks the network for a clean estimate ``x0`` and jumps straight to the next noise level, re-noising
with fresh noise (so they are samplers, not ODE solvers, except TCD / cm with gamma = 0, which are DDIM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._math import init_scale
from .grids import (
    NfeLimit,
    consistency_timesteps_grid,
    distilled_timesteps,
    flow_match_grid,
    grid_step_limit,
)
from .registry import BuildContext, CommonOptions, register
from .schedules import EDM, DiscreteVP, Flow

__all__ = ["LCMOptions", "TCDOptions", "CMOptions"]


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _unit_interval(name: str, v) -> None:
    if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


@dataclass(frozen=True)
class LCMOptions(CommonOptions):
    """original_inference_steps: the distillation grid the timesteps are picked from (LCMScheduler's, 50).
    timestep_scaling: multiplies the timestep in the boundary scalings c_skip / c_out (10)."""

    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        _positive_int("original_inference_steps", self.original_inference_steps)
        if not (isinstance(self.timestep_scaling, (int, float)) and math.isfinite(self.timestep_scaling)
                and self.timestep_scaling > 0):
            raise ValueError(f"timestep_scaling must be a finite number > 0, got {self.timestep_scaling!r}")
        if self.final != "zero":
            raise ValueError("lcm always ends on the boundary-conditioned x0 estimate: final must be 'zero'")


@dataclass(frozen=True)
class TCDOptions(CommonOptions):
    """gamma: TCD's stochasticity (diffusers' ``eta``): 0 = deterministic (DDIM), 1 = fully re-noised.
    final: 'sigma_min' (default, as TCDScheduler: the last step lands on timestep 0) or 'zero' (clean x0)."""

    final: str = "sigma_min"
    gamma: float = 0.3
    original_inference_steps: int = 50

    def __post_init__(self):
        super().__post_init__()
        _unit_interval("gamma", self.gamma)
        _positive_int("original_inference_steps", self.original_inference_steps)


@dataclass(frozen=True)
class CMOptions(CommonOptions):
    """gamma: CTM's gamma (0 = deterministic jump, i.e. DDIM; 1 = consistency multistep sampling).
    s_noise: scale of the fresh noise (CMStochasticIterativeScheduler's s_noise).
    train_steps: None (grid from ``spacing``) or N: the Karras grid of a consistency model trained with N
    discretization steps (CMStochasticIterativeScheduler(num_train_timesteps=N)); EDM schedules only."""

    gamma: float = 1.0
    s_noise: float = 1.0
    train_steps: int | None = None

    def __post_init__(self):
        super().__post_init__()
        _unit_interval("gamma", self.gamma)
        if not (isinstance(self.s_noise, (int, float)) and math.isfinite(self.s_noise) and self.s_noise >= 0):
            raise ValueError(f"s_noise must be a finite number >= 0, got {self.s_noise!r}")
        if self.train_steps is not None:
            _positive_int("train_steps", self.train_steps)
            if self.train_steps < 2:
                raise ValueError(f"train_steps must be >= 2, got {self.train_steps}")


# -- grids ------------------------------------------------------------------------------------------------
def _need_vp(ctx: BuildContext) -> DiscreteVP:
    sched = ctx.spec.schedule
    if not isinstance(sched, DiscreteVP):
        raise ValueError(f"{ctx.name} works on discrete VP timesteps (DiscreteVP schedule), got "
                         f"{type(sched).__name__}; use 'cm' for consistency sampling on other schedules")
    return sched


# -- samplers ---------------------------------------------------------------------------------------------
def _distilled_max_nfe(ctx: BuildContext, o: LCMOptions | TCDOptions) -> NfeLimit | None:
    if ctx.spacing.name == "timesteps":
        return grid_step_limit(ctx.spec, ctx.spacing, "euler")
    k = o.original_inference_steps
    return k, f"{ctx.name} picks its timesteps from the distillation grid, original_inference_steps={k}"


@register("lcm", LCMOptions, stochastic=True, order=None, max_nfe=_distilled_max_nfe)
def lcm(ctx: BuildContext, o: LCMOptions):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 3; diffusers LCMScheduler)."""
    sched = _need_vp(ctx)
    ts = distilled_timesteps(ctx, sched, o.original_inference_steps)
    b = ctx.builder(o)
    x = b.start(1.0)
    for i, t in enumerate(ts):
        out, _ = b.call(x, sched.point_at_timestep(t))
        c = t * o.timestep_scaling  # boundary condition: c_skip -> 1, c_out -> 0 at t = 0 (sigma_data = 0.5)
        c_skip, c_out = 0.25 / (c * c + 0.25), c / math.sqrt(c * c + 0.25)
        x0 = c_skip * out.x + c_out * out.x0
        b.annotate(t=t)
        if i == len(ts) - 1:
            x = x0
        else:
            q = sched.point_at_timestep(ts[i + 1])
            x = q.alpha * x0 + q.sigma * b.noise()
    return b.finish(x)


def _tcd_order(o: TCDOptions):
    return 1 if o.gamma == 0 else None


@register("tcd", TCDOptions, stochastic=lambda o: o.gamma > 0, order=_tcd_order, max_nfe=_distilled_max_nfe)
def tcd(ctx: BuildContext, o: TCDOptions):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, Alg. 4)."""
    sched = _need_vp(ctx)
    ts = distilled_timesteps(ctx, sched, o.original_inference_steps)
    end = sched.point_at_sigma(0.0, 0.0) if o.final == "zero" else sched.point_at_timestep(0)
    b = ctx.builder(o)
    x = b.start(1.0)
    for i, t in enumerate(ts):
        out, _ = b.call(x, sched.point_at_timestep(t))
        b.annotate(t=t)
        if i == len(ts) - 1:
            x = end.alpha * out.x0 + end.sigma * out.eps
            continue
        q = sched.point_at_timestep(ts[i + 1])
        # s = floor((1 - gamma) t'), in float32 as TCDScheduler computes it
        s_t = int(np.floor(np.float32(1.0 - o.gamma) * np.float32(ts[i + 1])))
        s = sched.point_at_timestep(s_t)
        x = s.alpha * out.x0 + s.sigma * out.eps  # jump to the earlier point s ...
        if o.gamma > 0:  # ... and forward-diffuse back to t'
            ratio = q.alpha / s.alpha
            x = ratio * x + math.sqrt(max(1.0 - ratio * ratio, 0.0)) * b.noise()
        b.annotate(s=s_t)
    return b.finish(x)


def _cm_max_nfe(ctx: BuildContext, o: CMOptions) -> NfeLimit | None:
    if o.train_steps is not None:
        return o.train_steps, f"the grid is a subset of the {o.train_steps}-point training discretization"
    return grid_step_limit(ctx.spec, ctx.spacing, "euler")


@register("cm", CMOptions, stochastic=lambda o: o.gamma > 0 and o.s_noise > 0,
          order=lambda o: 1 if o.gamma == 0 else None, max_nfe=_cm_max_nfe)
def cm(ctx: BuildContext, o: CMOptions):
    """Consistency multistep sampling (Song et al. 2023, Alg. 1) / CTM gamma-sampling (Kim et al. 2024)."""
    sched = ctx.spec.schedule
    if o.train_steps is not None:
        if not isinstance(sched, EDM):
            raise ValueError(f"cm: train_steps (the consistency-training Karras grid) needs an EDM schedule, "
                             f"got {type(sched).__name__}")
        grid = consistency_timesteps_grid(sched, ctx.nfe, o.train_steps, ctx.spacing.rho, o.final)
    elif isinstance(sched, Flow):
        grid = flow_match_grid(ctx, ctx.nfe, o.final)
    else:
        grid = ctx.grid(ctx.nfe, family="euler", final=o.final)
    pts, end = grid.points, grid.points[-1]
    b = ctx.builder(o)
    x = b.start(init_scale(ctx.spec, pts[0], ctx.spacing.name, "multistep"))
    for i in range(grid.n):
        out, _ = b.call(x, pts[i])
        q = pts[i + 1]
        # r: the noise std at q above the end point (Song et al.: sqrt(t^2 - eps^2), eps = sigma_min), native
        # units; a 1 - gamma^2 share of its variance follows the predicted eps, gamma^2 is fresh noise
        r = q.alpha * math.sqrt(max(q.sigma_tilde ** 2 - end.sigma_tilde ** 2, 0.0))
        x = q.alpha * out.x0 + math.sqrt(1.0 - o.gamma ** 2) * r * out.eps
        if r > 0 and o.gamma > 0 and o.s_noise > 0:
            x = x + o.gamma * o.s_noise * r * b.noise()
        b.annotate(gamma=o.gamma)
    return b.finish(x)
