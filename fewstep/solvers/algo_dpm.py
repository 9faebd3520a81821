"""DPM-Solver++ (Lu et al. 2022): multistep 1/2/3M, their SDE variants, and the singlestep solver.

Same grids and order rules as diffusers' DPMSolverMultistepScheduler / DPMSolverSinglestepScheduler with
``algorithm_type="dpmsolver++"`` / ``"sde-dpmsolver++"``.  Every update is written over x0 predictions in the
schedule's native space with ``h = lambda_t - lambda_s`` (half log-SNR steps).

The SDE updates are the ODE ones with ``g = 2 h`` in the exponential integrators plus fresh noise
(k-diffusion's ``eta = 1``).  Note: diffusers' third-order ``sde-dpmsolver++`` update weights D2 by
``(1 - e^-2h - 2h) / (2h)^2 - 0.5``, which tends to -1 (not 0) as ``h -> 0``: a sign slip.  We use ``+ 0.5``,
the ``g = 2 h`` analogue of the ODE update's weight and k-diffusion's ``sample_dpmpp_3m_sde``
(tests/solvers/test_dpm_parity.py patches diffusers the same way).  The third-order multistep D2 weight itself
(diffusers, k-diffusion and the reference code alike) is half the Taylor coefficient (D2 ~ h^2 x0'' / 2), so
dpmpp_3m is globally second order; we keep the published update by default for parity, and
``taylor_d2=True`` gives the Taylor-consistent weight (measured third order on the Gaussian-mixture oracle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._math import expm1_neg, init_scale
from .grids import dpm_grid
from .program import Lin, ProgramBuilder
from .registry import BuildContext, CommonOptions, register
from .schedules import Point

_SOLVER_TYPES = ("midpoint", "heun")


@dataclass(frozen=True)
class _DPMBase(CommonOptions):
    order: int = 2
    solver_type: str = "midpoint"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {self.order!r}")
        if self.solver_type not in _SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {_SOLVER_TYPES}, got {self.solver_type!r}")


@dataclass(frozen=True)
class DPMOptions(_DPMBase):
    """order: 1, 2 or 3 (the history length); solver_type: "midpoint" or "heun" (the second-order variant).
    taylor_d2: give the third-order update's second divided difference its Taylor weight (twice the published
    one), which makes order 3 really third order; no diffusers equivalent, ODE updates only.

    Order schedule as diffusers: step i uses order min(order, i + 1); the last step is first order when
    euler_at_final, when final="zero", or when lower_order_final and nfe < 15; the step before it is at most
    second order when lower_order_final and nfe < 15.
    """

    taylor_d2: bool = False


@dataclass(frozen=True)
class DPM3Options(DPMOptions):
    """DPMOptions with order 3 by default (dpmpp_3m, dpmpp_3m_sde)."""

    order: int = 3


@dataclass(frozen=True)
class DPMSinglestepOptions(_DPMBase):
    """order: 1, 2 or 3; solver_type: "midpoint" or "heun".

    Order schedule as diffusers' DPMSolverSinglestepScheduler: blocks of orders 1, 2, .., order; with
    lower_order_final the tail drops to lower orders.  As in diffusers, lower_order_final is forced on when
    nfe is not a multiple of order or final="zero" (the last step is then first order).
    """


# -- shared update math -------------------------------------------------------------------------------------
def _phis(g: float) -> tuple[float, float, float]:
    """Exponential-integrator weights for a step of length ``g`` in lambda: ``phi1 = 1 - e^-g`` and
    ``w_k = int_0^g (u / g)^k / k! e^-(g - u) du`` for k = 1, 2, i.e. ``1 - phi1 / g`` and
    ``(phi1 - g) / g^2 + 1/2`` (the weights the published updates put on D1 and D2)."""
    phi1 = -expm1_neg(g)
    if g == 0.0:
        return 0.0, 0.0, 0.0
    if math.isinf(g):
        return phi1, 1.0, 0.5
    return phi1, 1.0 - phi1 / g, (phi1 - g) / (g * g) + 0.5


def _dpmpp_step(b: ProgramBuilder, x: Lin, s: Point, t: Point, d0: Lin, d1: Lin | None = None,
                d2: Lin | None = None, midpoint: bool = False, sde: bool = False) -> Lin:
    """One DPM-Solver++ update from ``x`` at ``s`` to ``t`` given the divided differences D0 (the x0
    prediction), D1 (~ h x0') and D2 (~ h^2 x0''); ``midpoint``: D1 gets the midpoint weight phi1 / 2."""
    h = t.lam - s.lam
    g = 2.0 * h if sde else h
    phi1, w1, w2 = _phis(g)
    decay = math.exp(-h) if sde else 1.0
    out = (t.sigma / s.sigma * decay) * x + (t.alpha * phi1) * d0
    if d1 is not None:
        out = out + (t.alpha * (0.5 * phi1 if midpoint else w1)) * d1
    if d2 is not None:
        out = out + (t.alpha * w2) * d2
    if sde and t.sigma * phi1 > 0:
        out = out + (t.sigma * math.sqrt(phi1)) * b.noise()
    return out


def _ratio(num: float, den: float) -> float:
    """``num / den`` for step-size ratios; +inf (a history point at zero SNR) makes its difference vanish, and
    two steps from the same zero-SNR start have ratio 1 (the limit)."""
    if math.isinf(num) and math.isinf(den) and num > 0 and den > 0:
        return 1.0
    r = num / den if den != 0.0 else math.nan
    if math.isnan(r):
        raise ValueError("DPM-Solver++: degenerate step sizes (two grid points at the same noise level, or a "
                         "higher-order step from a zero-SNR point); use a strictly decreasing grid or a "
                         "lower order")
    return r


# -- multistep ----------------------------------------------------------------------------------------------
def multistep_orders(n: int, o: DPMOptions) -> list[int]:
    """The order of each of ``n`` steps, by diffusers' DPMSolverMultistepScheduler rules."""
    lower = o.lower_order_final and n < 15
    orders = []
    for i in range(n):
        k = min(o.order, i + 1)
        if i == n - 1 and (o.euler_at_final or lower or o.final == "zero"):
            k = 1
        elif i == n - 2 and lower:
            k = min(k, 2)
        orders.append(k)
    return orders


def _multistep(ctx: BuildContext, o: DPMOptions, sde: bool):
    if sde and o.taylor_d2:
        raise ValueError(f"{ctx.name}: taylor_d2 is derived for the ODE update only (dpmpp_2m / dpmpp_3m)")
    grid = dpm_grid(ctx, o.final)
    pts, n = grid.points, grid.n
    orders = multistep_orders(n, o)
    b = ctx.builder(o)
    x = b.start(init_scale(ctx.spec, pts[0], ctx.spacing.name))
    hist: list[Lin] = []  # x0 predictions of earlier steps, newest first
    for i in range(n):
        # older outputs still needed from step i on (a step of order k reads k - 1 of them)
        need = max(orders[j] - 1 - (j - i) for j in range(i, min(n, i + o.order)))
        out, hist = b.call(x, pts[i], keep=hist[:need])
        k = orders[i]
        b.annotate(order=k)
        s0, t, m0 = pts[i], pts[i + 1], out.x0
        if t.lam == s0.lam:  # zero-length step (karras + final="sigma_min"): exact identity (diffusers: NaN)
            x = out.x
        elif k == 1:
            x = _dpmpp_step(b, out.x, s0, t, m0, sde=sde)
        elif k == 2:
            s1, m1 = pts[i - 1], hist[0]
            r0 = _ratio(s0.lam - s1.lam, t.lam - s0.lam)
            midpoint = o.solver_type == "midpoint"
            x = _dpmpp_step(b, out.x, s0, t, m0, (m0 - m1) / r0, midpoint=midpoint, sde=sde)
        else:
            s1, s2, m1, m2 = pts[i - 1], pts[i - 2], hist[0], hist[1]
            h = t.lam - s0.lam
            r0, r1 = _ratio(s0.lam - s1.lam, h), _ratio(s1.lam - s2.lam, h)
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 x0'' / 2, while the weight w2 multiplies h^2 x0''
            if o.taylor_d2:
                d2 = 2.0 * d2
            x = _dpmpp_step(b, out.x, s0, t, m0, d1, d2, sde=sde)
        hist = [m0] + hist
    return b.finish(x)


@register("dpmpp_2m", DPMOptions, order=lambda o: o.order)
def dpmpp_2m(ctx: BuildContext, o: DPMOptions):
    """DPM-Solver++(2M), Lu et al. 2022 (multistep, data prediction; order 1-3)."""
    return _multistep(ctx, o, sde=False)


@register("dpmpp_3m", DPM3Options, order=lambda o: o.order)
def dpmpp_3m(ctx: BuildContext, o: DPM3Options):
    """DPM-Solver++(3M), Lu et al. 2022 (multistep, data prediction, third order)."""
    return _multistep(ctx, o, sde=False)


@register("dpmpp_2m_sde", DPMOptions, stochastic=True)
def dpmpp_2m_sde(ctx: BuildContext, o: DPMOptions):
    """SDE-DPM-Solver++(2M), Lu et al. 2022 (multistep solver of the reverse diffusion SDE)."""
    return _multistep(ctx, o, sde=True)


@register("dpmpp_3m_sde", DPM3Options, stochastic=True)
def dpmpp_3m_sde(ctx: BuildContext, o: DPM3Options):
    """SDE-DPM-Solver++(3M), Lu et al. 2022 / k-diffusion (third-order multistep reverse-SDE solver)."""
    return _multistep(ctx, o, sde=True)


# -- singlestep ---------------------------------------------------------------------------------------------
def singlestep_orders(n: int, o: DPMOptions) -> list[int]:
    """The order of each of ``n`` network calls, by diffusers' DPMSolverSinglestepScheduler.get_order_list."""
    k = o.order
    if o.lower_order_final or n % k != 0 or o.final == "zero":
        q, rem = divmod(n, k)
        if k == 1:
            orders = [1] * n
        elif rem == 0:  # the last block drops one order and ends with a first-order step
            orders = list(range(1, k + 1)) * (q - 1) + list(range(1, k)) + [1]
        else:
            orders = list(range(1, k + 1)) * q + list(range(1, rem + 1))
    else:
        orders = list(range(1, k + 1)) * (n // k)
    if o.final == "zero":
        orders[-1] = 1
    return orders


@register("dpmpp_2s", DPMSinglestepOptions, order=lambda o: o.order)
def dpmpp_2s(ctx: BuildContext, o: DPMSinglestepOptions):
    """DPM-Solver++(2S), Lu et al. 2022 (singlestep; intermediate points are grid points, as in diffusers)."""
    grid = dpm_grid(ctx, o.final)
    pts, n = grid.points, grid.n
    orders = singlestep_orders(n, o)
    b = ctx.builder(o)
    x = b.start(init_scale(ctx.spec, pts[0], ctx.spacing.name))
    block: list[Lin] = []  # [x at the block start, x0 predictions of the block so far]
    for i in range(n):
        k = orders[i]
        out, block = b.call(x, pts[i], keep=block if k > 1 else [])
        b.annotate(order=k)
        t, m0 = pts[i + 1], out.x0
        if k == 1:
            block = [out.x]
            x = _dpmpp_step(b, out.x, pts[i], t, m0)
        elif k == 2:
            (xs, m1), s1, s0 = block, pts[i - 1], pts[i]
            r0 = _ratio(s0.lam - s1.lam, t.lam - s1.lam)
            x = _dpmpp_step(b, xs, s1, t, m1, (m0 - m1) / r0, midpoint=o.solver_type == "midpoint")
        else:
            (xs, m2, m1), s2, s1, s0 = block, pts[i - 2], pts[i - 1], pts[i]
            h = t.lam - s2.lam
            r0, r1 = _ratio(s0.lam - s2.lam, h), _ratio(s1.lam - s2.lam, h)
            d1_0, d1_1 = (m1 - m2) / r1, (m0 - m2) / r0
            if o.solver_type == "midpoint":
                x = _dpmpp_step(b, xs, s2, t, m2, d1_1)
            else:
                inv = _ratio(1.0, r0 - r1)
                d1, d2 = inv * (r0 * d1_0 - r1 * d1_1), (2.0 * inv) * (d1_1 - d1_0)
                x = _dpmpp_step(b, xs, s2, t, m2, d1, d2)
        block = block + [m0]
    return b.finish(x)
