"""DEIS (Zhang & Chen 2022), multistep log-rho variant, as diffusers' DEISMultistepScheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._math import first_order, init_scale, interpolation_nodes, multistep_order
from .grids import deis_grid, deis_step_limit
from .program import Lin, lin_sum
from .registry import BuildContext, CommonOptions, register

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
    ``e^u P(u)`` is ``e^u (P - P' + P'' - ...)``, which tends to 0 as ``rho_t -> 0`` (a step to sigma = 0).
    Exact polynomial arithmetic on coefficient lists (degree <= 2 here), no quadrature."""
    u = [math.log(r) for r in rhos]
    log_t = math.log(rho_t) if rho_t > 0 else -math.inf
    weights = []
    for j, uj in enumerate(u):
        basis = [1.0]  # ascending coefficients of prod_m (u - u_m) / (u_j - u_m)
        for um in u[:j] + u[j + 1:]:
            basis = [(a - um * b) / (uj - um) for a, b in zip([0.0] + basis, basis + [0.0])]
        alt, d, sign = [0.0] * len(basis), basis, 1.0  # P - P' + P'' - ...
        while d:
            alt = [a + sign * c for a, c in zip(alt, d + [0.0] * (len(alt) - len(d)))]
            d, sign = [k * c for k, c in enumerate(d)][1:], -sign

        def antiderivative(v: float, q: list[float] = alt) -> float:
            return 0.0 if v == -math.inf else math.exp(v) * sum(c * v**k for k, c in enumerate(q))

        weights.append(antiderivative(log_t) - antiderivative(u[0]))
    return weights


@register("deis", DEISOptions, order=lambda o: o.order, max_nfe=lambda ctx, o: deis_step_limit(ctx, o.final))
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
        order = min(interpolation_nodes(pts, i),
                    multistep_order(o.order, i, n, lower_final=o.lower_order_final and n < 15,
                                    euler_at_final=o.euler_at_final))
        b.annotate(order=order)
        p, q = pts[i], pts[i + 1]
        if order == 1:
            x = first_order(x, out.x0, p, q)
            continue
        c = logrho_weights(q.sigma_tilde, [pts[i - k].sigma_tilde for k in range(order)])
        x = (q.alpha / p.alpha) * x + q.alpha * lin_sum(cj * e for cj, e in zip(c, eps))
    return b.finish(x)
