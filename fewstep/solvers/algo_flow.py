"""Flow-matching samplers (diffusers FlowMatchEulerDiscrete / FlowMatchHeunDiscrete) for SD3 / Flux models.

The grid is built here because FlowMatchEulerDiscreteScheduler builds it its own way: with a static ``shift``
the scheduler's sigma table is already shifted when ``set_timesteps`` spaces ``linspace(max, min)`` and
shifts again, so the last sigma is ``shift(shift(1 / T))``, not ``shift(1 / T)``.  With dynamic shifting
(``Flow(mu=...)``) the table is unshifted and ``mu`` is applied once.
"""

from __future__ import annotations

import math

import numpy as np

from ._math import first_order
from .algo_heun import final_is_euler, heun_program, heun_steps
from .registry import BuildContext, CommonOptions, register
from .schedules import Flow
from .spacing import Grid, beta_sigmas, exponential_sigmas, karras_sigmas

__all__ = ["flow_match_grid"]


def _check_flow(ctx: BuildContext) -> Flow:
    sched = ctx.spec.schedule
    if not isinstance(sched, Flow):
        raise ValueError(
            f"{ctx.name} needs a Flow schedule (rectified flow: SD3 / Flux), got {type(sched).__name__}; "
            f"use {'euler' if ctx.name == 'flow_euler' else 'heun'} for other schedules"
        )
    return sched


def _shift(sched: Flow, t):
    if sched.mu is not None:
        return math.exp(sched.mu) / (math.exp(sched.mu) + (1.0 / t - 1.0))
    return sched.shift * t / (1.0 + (sched.shift - 1.0) * t)


def flow_match_grid(ctx: BuildContext, n: int, final: str = "zero") -> Grid:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(n): shifted linspace, or karras / exponential / beta."""
    import torch

    sched = _check_flow(ctx)
    sp = ctx.spacing
    if sp.name not in ("flow", "linspace", "karras", "exponential", "beta"):
        return ctx.grid(n, family="euler", final=final)  # explicit timesteps / sigmas
    T = sched.num_train_timesteps
    # the scheduler's own sigma table (float32, as its __init__ builds it) sets the range
    table = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
    if sched.mu is None:
        table = _shift(sched, table)
    t_max, t_min = table[0].item(), table[-1].item()
    ts = _shift(sched, np.linspace(t_max * T, t_min * T, n) / T)
    if sp.name == "karras":
        ts = karras_sigmas(ts[-1], ts[0], n, sp.rho)
    elif sp.name == "exponential":
        ts = exponential_sigmas(ts[-1], ts[0], n)
    elif sp.name == "beta":
        ts = beta_sigmas(ts[-1], ts[0], n, sp.beta_a, sp.beta_b)
    end = 0.0 if final == "zero" else 1.0 / T
    vals = np.concatenate([ts, [end]]).astype(np.float32).astype(np.float64)
    if ctx.spec.prediction == "epsilon" and vals[0] >= 1.0:
        raise ValueError(f"{ctx.name}: an epsilon-prediction network carries no x0 information at t = 1 "
                         f"(pure noise), where this grid starts; use a flow or sample prediction spec")
    return Grid(tuple(sched.point_at_t(float(t)) for t in vals), {"spacing": sp.name, "family": "flow"})


@register("flow_euler", order=1, diffusers=lambda o, sp: ("FlowMatchEulerDiscreteScheduler", {}))
def flow_euler(ctx: BuildContext, o: CommonOptions):
    """Euler's method on the rectified-flow ODE dx/dt = v (Liu et al. 2022; Esser et al. 2024, SD3)."""
    grid = flow_match_grid(ctx, ctx.nfe, o.final)
    b = ctx.builder(o)
    pts = grid.points
    x = b.start(1.0)
    for i in range(grid.n):
        out, (x,) = b.call(x, pts[i], keep=[x])
        b.annotate(order=1)
        x = first_order(x, out.x0, pts[i], pts[i + 1])  # = x + (t' - t) v, exactly
    return b.finish(x)


@register("flow_heun", order=2, diffusers=lambda o, sp: ("FlowMatchHeunDiscreteScheduler", {}))
def flow_heun(ctx: BuildContext, o: CommonOptions):
    """Heun's 2nd order method on the rectified-flow ODE in t (Karras et al. 2022, Alg. 1; FlowMatchHeun)."""
    _check_flow(ctx)
    n = heun_steps(ctx.nfe, final_is_euler(ctx, o), ctx.name)
    return heun_program(ctx, o, flow_match_grid(ctx, n, o.final), flow=True)
