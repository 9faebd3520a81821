"""Heun's method (Karras et al. 2022, Alg. 1): diffusers HeunDiscrete (k-diffusion variables) and
FlowMatchHeunDiscrete (flow time t).  Two calls per step, Euler into sigma = 0."""

from __future__ import annotations

from ._math import first_order, heun_step, init_scale
from .grids import NFE_MAX, NfeLimit, flow_match_grid, grid_step_limit
from .registry import BuildContext, CommonOptions, register


def heun_steps(nfe: int, final_euler: bool, solver: str) -> int:
    """Grid steps ``n`` giving ``nfe`` calls: ``2n - 1`` when the last step is Euler, else ``2n``; ValueError
    naming the valid NFEs otherwise."""
    n, rem = divmod(nfe + (1 if final_euler else 0), 2)
    if rem:
        kind, valid = ("odd", "1, 3, 5, ...") if final_euler else ("even", "2, 4, 6, ...")
        why = "the last step (into sigma = 0, or with euler_at_final) is Euler" if final_euler else \
            "every step is a Heun step"
        raise ValueError(f"{solver} makes 2 calls per step and {why}: nfe must be {kind} ({valid}), "
                         f"got {nfe}")
    return n


def heun_program(ctx: BuildContext, o: CommonOptions, grid, *, flow: bool):
    """The Heun loop over ``grid`` (Karras space, or flow time ``t`` with ``flow=True``)."""
    b = ctx.builder(o)
    pts = grid.points
    x = b.start(init_scale(ctx.spec, pts[0], ctx.spacing.name, "euler"))
    for i in range(grid.n):
        p, q = pts[i], pts[i + 1]
        out, (x,) = b.call(x, p, keep=[x])
        x_pred = first_order(x, out.x0, p, q)  # Euler predictor
        if q.sigma == 0 or (o.euler_at_final and i == grid.n - 1):
            b.annotate(order=1)
            x = x_pred
            continue
        b.annotate(order=2, stage="predictor")
        out, (x,) = b.call(x_pred, q, keep=[x])
        b.annotate(order=2, stage="corrector")
        x = heun_step(x, out.x, out.x0, p, q, flow=flow)
    return b.finish(x)


def final_is_euler(ctx: BuildContext, o: CommonOptions) -> bool:
    """Whether the grid's last step is Euler: it ends at sigma = 0, or ``euler_at_final`` asks for it."""
    if ctx.spacing.name == "sigmas":
        return o.euler_at_final or ctx.spacing.values[-1] == 0
    return o.euler_at_final or o.final == "zero"


def heun_max_nfe(ctx: BuildContext, o: CommonOptions) -> NfeLimit:
    """Two calls per step of the euler-family grid (one on a final Euler step); the count keeps the parity
    heun_steps asks for, so the largest is odd when the last step is Euler."""
    final_euler = final_is_euler(ctx, o)
    steps = grid_step_limit(ctx.spec, ctx.spacing, "euler")
    if steps is not None and 2 * steps[0] - final_euler <= NFE_MAX:
        return 2 * steps[0] - final_euler, steps[1]
    return NFE_MAX - (NFE_MAX + final_euler) % 2, f"fewstep builds at most NFE_MAX={NFE_MAX} network calls"


@register("heun", order=2, max_nfe=heun_max_nfe)
def heun(ctx: BuildContext, o: CommonOptions):
    """Heun's 2nd order method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn)."""
    if ctx.spec.schedule.kind == "flow":
        raise ValueError("heun steps in k-diffusion variables (x / alpha), which diverge at t = 1 of a Flow "
                         "schedule; use flow_heun (Heun in t, as FlowMatchHeunDiscrete) for flow models")
    n = heun_steps(ctx.nfe, final_is_euler(ctx, o), ctx.name)
    return heun_program(ctx, o, ctx.grid(n, family="euler", final=o.final), flow=False)


@register("flow_heun", order=2, max_nfe=heun_max_nfe)
def flow_heun(ctx: BuildContext, o: CommonOptions):
    """Heun's 2nd order method on the rectified-flow ODE in t (Karras et al. 2022, Alg. 1; FlowMatchHeun)."""
    grid = flow_match_grid(ctx, heun_steps(ctx.nfe, final_is_euler(ctx, o), ctx.name), o.final)
    return heun_program(ctx, o, grid, flow=True)
