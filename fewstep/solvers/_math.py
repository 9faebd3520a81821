"""Shared solver math over :class:`~fewstep.solvers.program.Lin` values (lives once; every solver uses it)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .program import Lin
from .schedules import Point
from .spec import ModelSpec

__all__ = ["first_order", "init_scale", "expm1_neg", "heun_step", "multistep_order", "interpolation_nodes"]


def first_order(x: Lin, x0: Lin, p: Point, q: Point) -> Lin:
    """One first-order step from ``p`` to ``q`` given the x0 prediction: DDIM (eta = 0) = Euler in
    ``(x / alpha, sigma / alpha)`` = DPM-Solver++(1).  ``x' = (sigma_q / sigma_p) x + (alpha_q - alpha_p
    sigma_q / sigma_p) x0``; exact for every schedule family (VP, EDM, flow)."""
    r = q.sigma / p.sigma
    return r * x + (q.alpha - p.alpha * r) * x0


def expm1_neg(h: float) -> float:
    """``exp(-h) - 1`` without cancellation; ``-1`` at ``h = inf`` (a step to sigma = 0)."""
    return -1.0 if math.isinf(h) else math.expm1(-h)


def init_scale(spec: ModelSpec, first: Point, spacing: str, family: str = "multistep") -> float:
    """Scale of the starting sample ``x_T = scale * noise`` in the schedule's native space.

    VP, multistep family: 1 (the VP marginal, as DPMSolverMultistep / UniPC / DEIS / DDIM start).  VP, euler
    family: diffusers' Euler / Heun start at ``sigma_max * noise`` in k-diffusion space (``sigma`` in VP
    space), except with 'leading' spacing where they start at ``sqrt(sigma_max^2 + 1) * noise`` (1 in VP
    space). EDM: sigma_max.  Flow: 1 (t = 1 is pure noise).
    """
    kind = spec.schedule.kind
    if kind == "edm":
        return first.sigma
    if kind == "vp" and family == "euler" and spacing != "leading":
        return first.sigma
    return 1.0


def heun_step(x: Lin, x_pred: Lin, x0_pred: Lin, p: Point, q: Point, *, flow: bool = False) -> Lin:
    """Heun's corrector (Karras et al. 2022, Alg. 1 l. 10) from ``p`` to ``q``: ``y + h/2 (d_p + d_q)``.

    ``x_pred`` is the Euler prediction at ``q`` (so ``y + h d_p = y_pred``), ``x0_pred`` the network's x0
    there.
    The ODE is in k-diffusion variables (``y = x / alpha``, ``s = sigma / alpha``), or with ``flow=True`` in
    flow-matching ones (``y = x``, ``s = t``; FlowMatchHeun); the slope is ``d = (y - x0) / s`` in both.
    """
    (cp, sp), (cq, sq) = (
        ((1.0, p.sigma), (1.0, q.sigma)) if flow else ((p.alpha, p.sigma_tilde), (q.alpha, q.sigma_tilde))
    )
    y, y_pred = x / cp, x_pred / cq
    d_q = (y_pred - x0_pred) / sq
    return cq * (0.5 * (y + y_pred) + 0.5 * (sq - sp) * d_q)


def multistep_order(order: int, i: int, n: int, *, lower_final: bool, euler_at_final: bool = False) -> int:
    """Order of step ``i`` of ``n`` for a multistep solver of nominal ``order``: warm-up (only ``i + 1``
    outputs exist yet), ``lower_final`` (at most ``n - i`` on the last steps; diffusers' lower_order_final,
    whose ``n < 15`` condition, where a scheduler has one, is the caller's) and ``euler_at_final``."""
    k = min(order, i + 1)
    if lower_final:
        k = min(k, n - i)
    if euler_at_final and i == n - 1:
        k = 1
    return k


def interpolation_nodes(pts: Sequence[Point], i: int) -> int:
    """How many of ``pts[0..i]`` a multistep solver can interpolate through at step ``i`` (at least 1): a
    pure-noise point (alpha = 0, lambda = -inf) is no node, and only a grid's first point can be one."""
    return max(1, i + 1 - int(pts[0].alpha == 0))
