"""Shared solver math over :class:`~fewstep.solvers.program.Lin` values (lives once; every solver uses it)."""

from __future__ import annotations

import math

from .program import Lin
from .schedules import Point
from .spec import ModelSpec

__all__ = ["first_order", "init_scale", "expm1_neg"]


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
    family: diffusers' Euler / Heun start at ``sigma_max * noise`` in k-diffusion space (``sigma`` in VP space),
    except with 'leading' spacing where they start at ``sqrt(sigma_max^2 + 1) * noise`` (1 in VP space).
    EDM: sigma_max.  Flow: 1 (t = 1 is pure noise).
    """
    kind = spec.schedule.kind
    if kind == "edm":
        return first.sigma
    if kind == "vp" and family == "euler" and spacing != "leading":
        return first.sigma
    return 1.0
