"""DEIS (Zhang & Chen 2022), multistep log-rho variant, as diffusers' DEISMultistepScheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import Polynomial

from ._math import first_order, init_scale, multistep_order
from .algo_unipc import diffusers_multistep_grid
from .program import Lin, lin_sum
from .registry import BuildContext, CommonOptions, register
from .spacing import Grid, Spacing

__all__ = ["DEISOptions", "deis", "logrho_weights"]


@dataclass(frozen=True)
class DEISOptions(CommonOptions):
    """order: 1-3 (number of noise predictions the polynomial interpolates)."""

    order: int = 2

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"deis order must be 1, 2 or 3, got {self.order!r}")


def logrho_weights(rho_t: float, rhos: list[float]) -> list[float]:
    """``c_j = integral from rhos[0] to rho_t of L_j(log rho) d rho``, ``L_j`` the Lagrange basis on the
    nodes ``log rhos`` (DEIS eq. 14, rho = sigma / alpha).  With ``u = log rho`` the antiderivative of
    ``e^u P(u)`` is ``e^u (P - P' + P'' - ...)``, which tends to 0 as ``rho_t -> 0`` (a step to sigma = 0)."""
    u = np.log(np.asarray(rhos, dtype=np.float64))
    weights = []
    for j in range(len(u)):
        others = np.delete(u, j)
        basis = Polynomial.fromroots(others) if len(others) else Polynomial([1.0])
        basis = basis / float(np.prod(u[j] - others))

        def antiderivative(v: float, p: Polynomial = basis) -> float:
            if v == -math.inf:
                return 0.0
            return math.exp(v) * sum((-1) ** k * p.deriv(k)(v) for k in range(len(u)))

        log_t = math.log(rho_t) if rho_t > 0 else -math.inf
        weights.append(antiderivative(log_t) - antiderivative(u[0]))
    return weights


def deis_grid(ctx: BuildContext, n: int, final: str) -> Grid:
    """diffusers' DEIS grid without its repeated last sigma.  With a sigma spacing diffusers appends a copy of
    the last sigma, so its last step goes nowhere and its last network call is wasted.  Where the grid would
    end on a repeated point we space ``n + 1`` distinct points down to that same end instead: every call is
    used, and the result is diffusers' with ``n + 1`` steps."""
    grid = diffusers_multistep_grid(ctx, n, final)
    if not math.isclose(grid.points[-1].sigma_tilde, grid.points[-2].sigma_tilde, rel_tol=1e-12):
        return grid
    longer = diffusers_multistep_grid(ctx, n + 1, final)
    return Grid(longer.points[:-1], longer.meta)


def _diffusers(o: DEISOptions, sp: Spacing) -> tuple[str, dict]:
    if o.final != "sigma_min":
        raise ValueError("DEISMultistepScheduler always ends at sigma_min: use final='sigma_min' to match it")
    if o.euler_at_final:
        raise ValueError("DEISMultistepScheduler has no euler_at_final")
    if sp.name in ("karras", "exponential", "beta"):
        raise ValueError(
            f"DEISMultistepScheduler repeats the last {sp.name} sigma and wastes its last call: its n + 1 "
            f"steps equal fewstep's deis with nfe = n; there is no same-NFE equivalent"
        )
    return "DEISMultistepScheduler", {"solver_order": o.order, "lower_order_final": o.lower_order_final}


@register("deis", DEISOptions, order=lambda o: o.order, diffusers=_diffusers)
def deis(ctx: BuildContext, o: DEISOptions):
    """DEIS, Zhang & Chen 2022: multistep exponential integrator, noise predictions interpolated in log-rho.

    Repeated last sigma (diffusers with karras / exponential / beta sigmas): see :func:`deis_grid`.
    """
    grid = deis_grid(ctx, ctx.nfe, o.final)
    pts, n = grid.points, grid.n
    b = ctx.builder(o)
    x = b.start(init_scale(ctx.spec, pts[0], ctx.spacing.name))
    eps: list[Lin] = []  # noise predictions, newest first; eps[k] was taken at pts[i - k]
    for i in range(n):
        out, eps = b.call(x, pts[i], keep=eps)
        x = out.x
        eps = [out.eps] + eps[: o.order - 1]
        usable = max(1, sum(1 for p in pts[: i + 1] if p.alpha > 0))  # a pure-noise point is no node
        order = min(usable, multistep_order(o.order, i, n, lower_final=o.lower_order_final and n < 15,
                                            euler_at_final=o.euler_at_final))
        b.annotate(order=order)
        p, q = pts[i], pts[i + 1]
        if order == 1:
            x = first_order(x, out.x0, p, q)
            continue
        c = logrho_weights(q.sigma_tilde, [pts[i - k].sigma_tilde for k in range(order)])
        x = (q.alpha / p.alpha) * x + q.alpha * lin_sum(cj * e for cj, e in zip(c, eps))
    return b.finish(x)
