"""Euler's method: diffusers EulerDiscrete (k-diffusion variables) and FlowMatchEulerDiscrete (flow time t).
First order, one call per step."""

from __future__ import annotations

from ._math import first_order, init_scale
from .grids import NfeLimit, flow_match_grid, grid_step_limit
from .registry import BuildContext, CommonOptions, register
from .spacing import Grid


def euler_max_nfe(ctx: BuildContext, o: CommonOptions) -> NfeLimit | None:
    """One call per step of the euler-family grid."""
    return grid_step_limit(ctx.spec, ctx.spacing, "euler")


def euler_program(ctx: BuildContext, o: CommonOptions, grid: Grid):
    """Euler steps over ``grid``: exact for the first-order update in every schedule family (for flow it is
    ``x + (t' - t) v``)."""
    b = ctx.builder(o)
    pts = grid.points
    x = b.start(init_scale(ctx.spec, pts[0], ctx.spacing.name, "euler"))
    for i in range(grid.n):
        out, (x,) = b.call(x, pts[i], keep=[x])
        b.annotate(order=1)
        x = first_order(x, out.x0, pts[i], pts[i + 1])
    return b.finish(x)


@register("euler", order=1, max_nfe=euler_max_nfe)
def euler(ctx: BuildContext, o: CommonOptions):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn)."""
    return euler_program(ctx, o, ctx.grid(ctx.nfe, family="euler", final=o.final))


@register("flow_euler", order=1, max_nfe=euler_max_nfe)
def flow_euler(ctx: BuildContext, o: CommonOptions):
    """Euler's method on the rectified-flow ODE dx/dt = v (Liu et al. 2022; Esser et al. 2024, SD3)."""
    return euler_program(ctx, o, flow_match_grid(ctx, ctx.nfe, o.final))
