"""DDIM (Song et al. 2020) with diffusers' DDIMScheduler grid and eta noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .grids import NfeLimit, ddim_timesteps, timestep_step_limit
from .registry import BuildContext, CommonOptions, register
from .schedules import DiscreteVP, Point


@dataclass(frozen=True)
class DDIMOptions(CommonOptions):
    """eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral sampling (eq. 16 of the paper).

    final: "zero" ends at alpha_bar = 1 (diffusers' ``set_alpha_to_one=True``), "sigma_min" at the first
    training timestep's alpha_bar (``set_alpha_to_one=False``, as Stable Diffusion's config).
    lower_order_final and euler_at_final have no effect (DDIM is first order).
    """

    eta: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not (
                math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"ddim eta must be a finite number >= 0, got {self.eta!r}")


def _point(sched: DiscreteVP, t: int) -> Point:
    """The point at an integer timestep; with zero terminal SNR, DDIMScheduler keeps alpha_bar = 0 at T - 1
    (it has no 2**-24 clamp, unlike the sigma-based schedulers)."""
    if sched.rescale_zero_terminal_snr and t == sched.num_train_timesteps - 1:
        return Point(0.0, 1.0, float(t))
    return sched.point_at_timestep(float(t))


def _prev_point(sched: DiscreteVP, t: int, n: int, final: str) -> Point:
    """Where DDIM steps from ``t``: ``t - T // n`` (not the next grid timestep), or the end when negative."""
    prev = t - sched.num_train_timesteps // n
    if prev >= 0:
        return _point(sched, prev)
    return Point(1.0, 0.0, 0.0) if final == "zero" else _point(sched, 0)


def _ddim_max_nfe(ctx: BuildContext, o: DDIMOptions) -> NfeLimit | None:
    sched = ctx.spec.schedule
    return timestep_step_limit(sched.num_train_timesteps, ctx.spacing, "ddim") if isinstance(
        sched, DiscreteVP) else None


@register("ddim", DDIMOptions, stochastic=lambda o: o.eta > 0, order=lambda o: 1 if o.eta == 0 else None,
          default_spacing=lambda spec: "leading", max_nfe=_ddim_max_nfe)
def ddim(ctx: BuildContext, o: DDIMOptions):
    """DDIM, Song et al. 2020 (eq. 12; eta > 0 adds the eq. 16 noise)."""
    sched = ctx.spec.schedule
    if not isinstance(sched, DiscreteVP):
        raise ValueError(f"ddim needs a DiscreteVP schedule, got {type(sched).__name__}; use dpmpp_2m with "
                         f"order=1 (the same first-order update) for EDM / flow models")
    ts = ddim_timesteps(sched.num_train_timesteps, ctx.nfe, ctx.spacing)
    b = ctx.builder(o)
    x = b.start(1.0)
    for t in ts:
        p, q = _point(sched, int(t)), _prev_point(sched, int(t), ctx.nfe, o.final)
        if p.alpha == 0 and ctx.spec.prediction == "epsilon":
            raise ValueError("ddim: an epsilon-prediction model gives no x0 at the zero-SNR timestep "
                             f"{int(t)}; use v_prediction, or leading / linspace spacing")
        out, _ = b.call(x, p)
        b.annotate(order=1, t_prev=int(t) - sched.num_train_timesteps // ctx.nfe)
        # std = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev), with a = alpha^2
        std = o.eta * (q.sigma / p.sigma) * math.sqrt(max(1.0 - (p.alpha / q.alpha) ** 2, 0.0))
        x = q.alpha * out.x0 + math.sqrt(max(q.sigma**2 - std**2, 0.0)) * out.eps
        if std > 0:
            x = x + std * b.noise()
    return b.finish(x)
