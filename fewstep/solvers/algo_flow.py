"""Flow-matching samplers (diffusers FlowMatchEulerDiscrete / FlowMatchHeunDiscrete) for SD3 / Flux models.

Their grid is spacing.py's flow grid, which reproduces FlowMatchEulerDiscreteScheduler's.
"""

from __future__ import annotations

from ._math import first_order
from .algo_heun import final_is_euler, heun_program, heun_steps
from .registry import BuildContext, CommonOptions, register
from .schedules import Flow
from .spacing import Grid

__all__ = ["flow_match_grid"]


def _check_flow(ctx: BuildContext) -> Flow:
    sched = ctx.spec.schedule
    if not isinstance(sched, Flow):
        raise ValueError(
            f"{ctx.name} needs a Flow schedule (rectified flow: SD3 / Flux), got {type(sched).__name__}; "
            f"use {'euler' if ctx.name == 'flow_euler' else 'heun'} for other schedules"
        )
    return sched


def flow_match_grid(ctx: BuildContext, n: int, final: str = "zero") -> Grid:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(n): spacing.py's flow grid, which reproduces it."""
    _check_flow(ctx)
    grid = ctx.grid(n, family="euler", final=final)
    if ctx.spec.prediction == "epsilon" and grid.points[0].sigma >= 1.0:
        raise ValueError(f"{ctx.name}: an epsilon-prediction network carries no x0 information at t = 1 "
                         f"(pure noise), where this grid starts; use a flow or sample prediction spec")
    return grid


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
