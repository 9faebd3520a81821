"""Euler (k-diffusion / diffusers EulerDiscrete, FlowMatchEuler): first order, one call per step."""

from __future__ import annotations

from ._math import first_order, init_scale
from .registry import BuildContext, CommonOptions, register


@register(
    "euler", order=1, diffusers=lambda o, sp: ("EulerDiscreteScheduler", {"final_sigmas_type": o.final})
)
def euler(ctx: BuildContext, o: CommonOptions):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn)."""
    grid = ctx.grid(ctx.nfe, family="euler", final=o.final)
    b = ctx.builder(o)
    pts = grid.points
    x = b.start(init_scale(ctx.spec, pts[0], ctx.spacing.name, "euler"))
    for i in range(grid.n):
        out, (x,) = b.call(x, pts[i], keep=[x])
        b.annotate(order=1)
        x = first_order(x, out.x0, pts[i], pts[i + 1])
    return b.finish(x)
