"""UniPC (Zhao et al. 2023): UniP-p predictor + UniC-p corrector, as diffusers' UniPCMultistepScheduler.

The corrector of step ``i`` needs the network output at the predicted ``x_i``, so diffusers applies it at
the start of the *next* ``step()`` call.  Here it opens the stage that follows call ``i``: the predicted
``x_i`` (the network input), the corrected ``x_{i-1}`` and the history are registers, and corrector +
predictor fold into one linear map.  No corrector follows the last call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._math import init_scale, interpolation_nodes, multistep_order
from .grids import diffusers_multistep_grid, unipc_flow_grid
from .program import Lin, lin_sum
from .registry import BuildContext, CommonOptions, register
from .schedules import Flow, Point

__all__ = ["UniPCOptions", "unipc"]


@dataclass(frozen=True)
class UniPCOptions(CommonOptions):
    """order: UniP-p order (1-3; with the corrector the method has order p + 1).  solver_type: B(h) = h
    ("bh1") or e^h - 1 ("bh2").  corrector: apply UniC.  disable_corrector: diffusers' list semantics, entry
    ``k`` skips the correction of the sample that step ``k`` produced.  predict_x0: work on data predictions
    (UniPC's default) or on noise predictions."""

    order: int = 2
    solver_type: str = "bh2"
    corrector: bool = True
    disable_corrector: tuple[int, ...] = ()
    predict_x0: bool = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"unipc order must be 1, 2 or 3, got {self.order!r}")
        if self.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"unipc solver_type must be 'bh1' or 'bh2', got {self.solver_type!r}")
        dc = tuple(self.disable_corrector)
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in dc):
            raise ValueError(f"disable_corrector must hold step indices >= 0, got {self.disable_corrector!r}")
        object.__setattr__(self, "disable_corrector", dc)


def _uni_coeffs(h: float, rks: list[float], order: int, solver_type: str, predict_x0: bool):
    """UniPC's ``h phi_1``, ``B(h)`` and order-condition system ``R rho = b`` (Zhao et al. 2023, Alg. 2/3)."""
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if solver_type == "bh1" else h_phi_1
    rks = np.array(rks + [1.0])
    rows, b, fact = [], [], 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return h_phi_1, b_h, np.array(rows), np.array(b)


def _uni_base(x: Lin, m0: Lin, s: Point, t: Point, h_phi_1: float, predict_x0: bool) -> tuple[Lin, float]:
    """The exponential-integrator part of an update (DPM-Solver++(1)) and the scale of its B(h) term."""
    if predict_x0:
        return (t.sigma / s.sigma) * x - (t.alpha * h_phi_1) * m0, t.alpha
    # sigma_t (e^h - 1) written as alpha_t sigma_s / alpha_s - sigma_t: finite when sigma_t = 0
    return (t.alpha / s.alpha) * x - (t.alpha * s.sigma / s.alpha - t.sigma) * m0, t.sigma


def _uni_update(x: Lin, ms: list[Lin], pts: list[Point], t: Point, order: int, o: UniPCOptions,
                m_t: Lin | None = None) -> Lin:
    """UniP-p (``m_t`` None) or UniC-p (``m_t``: the output at ``t``) from ``pts[0]`` to ``t``; ``ms`` newest
    first, ``ms[k]`` taken at ``pts[k]``."""
    s = pts[0]
    if math.isclose(t.sigma_tilde, s.sigma_tilde, rel_tol=1e-12):  # repeated end point (karras + sigma_min)
        return x
    h = t.lam - s.lam
    rks = [(pts[k].lam - s.lam) / h for k in range(1, order)]
    d1s = [(ms[k] - ms[0]) / rks[k - 1] for k in range(1, order)]
    h_phi_1, b_h, R, b = _uni_coeffs(h, rks, order, o.solver_type, o.predict_x0)
    base, scale = _uni_base(x, ms[0], s, t, h_phi_1, o.predict_x0)
    if m_t is None:  # predictor
        if order == 1:
            return base  # no B(h) term (diffusers multiplies B(h) = -inf by 0 here for bh1 at sigma_t = 0)
        rhos = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
        return base - (scale * b_h) * lin_sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else list(np.linalg.solve(R, b))
    res = lin_sum(r * d for r, d in zip(rhos[:-1], d1s)) + rhos[-1] * (m_t - ms[0])
    return base - (scale * b_h) * res


@register("unipc", UniPCOptions, order=lambda o: o.order + int(o.corrector))
def unipc(ctx: BuildContext, o: UniPCOptions):
    """UniPC, Zhao et al. 2023: multistep UniP-p predictor + UniC-p corrector, B(h) = bh1 | bh2.

    Step to sigma = 0: UniP-p extrapolates the data prediction polynomially in lambda, which diverges as
    lambda -> inf for p >= 2 (diffusers: inf), so that step is taken with p = 1 (DPM-Solver++(1)), as
    DPMSolverMultistep does.  At p = 1 there is no B(h) term; diffusers still evaluates ``B(h) * 0``, which is
    NaN for bh1 (B(h) = h = inf): its known bh1 + zero-final NaN.  We omit the absent term.  That is the limit
    of diffusers' own bh1 result as the final sigma -> 0 (tested against a final sigma of 1e-10), and the same
    step bh2 takes.  (predict_x0=False has the same 0 * inf in sigma_t (e^h - 1); we use its exact form.)
    """
    if isinstance(ctx.spec.schedule, Flow) and ctx.spacing.name in ("flow", "linspace"):
        grid = unipc_flow_grid(ctx.spec.schedule, ctx.nfe, o.final)
    else:
        grid = diffusers_multistep_grid(ctx, ctx.nfe, o.final)
    pts, n = grid.points, grid.n
    b = ctx.builder(o)
    x = b.start(init_scale(ctx.spec, pts[0], ctx.spacing.name))
    ms: list[Lin] = []  # converted outputs, newest first; ms[k] was taken at pts[i - k]
    x_last, prev_order = None, 0
    if not o.predict_x0 and pts[0].alpha == 0:
        raise ValueError("unipc with predict_x0=False cannot start at a pure-noise point (alpha = 0); use "
                         "predict_x0=True")
    for i in range(n):
        correct = o.corrector and i > 0 and (i - 1) not in o.disable_corrector and pts[i - 1].alpha > 0
        keep = ([x_last] if correct else []) + ms
        out, kept = b.call(x, pts[i], keep=keep)
        x_last, ms = (kept[0], kept[1:]) if correct else (None, kept)
        m = out.x0 if o.predict_x0 else out.eps
        x = _uni_update(x_last, ms, list(pts[i - 1::-1]), pts[i], prev_order, o, m_t=m) if correct else out.x
        ms = [m] + ms[: o.order - 1]
        order = min(interpolation_nodes(pts, i),
                    multistep_order(o.order, i, n, lower_final=o.lower_order_final,
                                    euler_at_final=o.euler_at_final or pts[i + 1].sigma == 0))
        b.annotate(order=order, corrector=correct)
        x_last, prev_order = x, order
        x = _uni_update(x, ms, list(pts[i::-1]), pts[i + 1], order, o)
    return b.finish(x)
