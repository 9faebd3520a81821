"""Timestep grids: which points of the schedule a sampler visits.

A spacing is named once (``spacing="karras"``) or given as a :class:`Spacing` with its parameters.  Grids are
built the way diffusers builds them for the corresponding scheduler family, so the same config gives the same
timesteps (including diffusers' float32 rounding of sigma tables); the family is the solver's business:

* ``"multistep"`` -- DPMSolverMultistep / UniPC / DEIS / DPMSolverSinglestep: ``n + 1`` integer timesteps with
  the last dropped; sigma-space spacings map back to (rounded) timesteps.
* ``"euler"`` -- Euler / Heun: ``n`` (possibly fractional) timesteps with linearly interpolated sigmas.

Timestep spacings: linspace, leading (``steps_offset``), trailing.  Sigma spacings: karras (``rho``),
exponential, beta (``beta_a``, ``beta_b``), ays (Align Your Steps tables for SD1.5 / SDXL / SVD: the published
timesteps (SD1.5 / SDXL on a 1000-step VP schedule) or sigmas at 10 steps, sigmas log-linearly interpolated to
other step counts as in the AYS paper), and explicit ``timesteps`` / ``sigmas`` lists.  Flow
schedules use ``flow`` (the shifted linear grid of SD3 / Flux); EDM schedules default to karras.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .schedules import EDM, DiscreteVP, Flow, Point
from .spec import ModelSpec

__all__ = [
    "Spacing",
    "Grid",
    "SPACINGS",
    "make_grid",
    "karras_sigmas",
    "exponential_sigmas",
    "beta_sigmas",
    "ays_sigmas",
    "ays_timesteps",
    "AYS_SIGMAS",
    "AYS_TIMESTEPS",
    "as_spacing",
    "loglinear_interp",
]

SPACINGS = (
    "linspace",
    "leading",
    "trailing",
    "karras",
    "exponential",
    "beta",
    "ays",
    "flow",
    "timesteps",
    "sigmas",
)
_TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
_SIGMA_SPACINGS = ("karras", "exponential", "beta", "ays")
_VALID = {
    "vp": _TIMESTEP_SPACINGS + _SIGMA_SPACINGS + ("timesteps", "sigmas"),
    "edm": ("karras", "exponential", "beta", "ays", "sigmas"),
    "flow": ("flow", "linspace", "karras", "exponential", "beta", "timesteps", "sigmas"),
}

# Align Your Steps (Sabour et al. 2024), the published 10-step schedules: k-diffusion sigmas (last = 0) for
# each model, and for the discrete-time ones (SD1.5, SDXL) also their timesteps of the 1000-step training
# schedule, which is what those networks receive (the same numbers as diffusers' AysSchedules).  At 10 steps
# they are used as published; other step counts interpolate the sigmas log-linearly (the paper's App. C).
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.0),
}
AYS_TIMESTEPS = {
    "sd15": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24),
    "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13),
}
AYS_TRAIN_TIMESTEPS = 1000  # the schedule AYS_TIMESTEPS index


@dataclass(frozen=True)
class Spacing:
    """A spacing name with its parameters.  ``values`` holds an explicit list for "timesteps" / "sigmas"."""

    name: str
    rho: float = 7.0
    steps_offset: int = 0
    beta_a: float = 0.6
    beta_b: float = 0.6
    ays: str = "sd15"
    values: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.name not in SPACINGS:
            raise ValueError(f"unknown spacing {self.name!r}; valid spacings: {', '.join(SPACINGS)}")
        if self.name in ("timesteps", "sigmas"):
            if self.values is None or len(self.values) < 1:
                raise ValueError(f"spacing {self.name!r} needs a non-empty list of values")
            vals = tuple(float(v) for v in self.values)
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"spacing {self.name!r}: values must be finite, got {vals}")
            if any(a <= b for a, b in zip(vals, vals[1:])):
                raise ValueError(f"spacing {self.name!r}: values must be strictly decreasing, got {vals}")
            if min(vals) < 0:
                raise ValueError(f"spacing {self.name!r}: values must be >= 0, got {vals}")
            object.__setattr__(self, "values", vals)
        if not (self.rho > 0 and math.isfinite(self.rho)):
            raise ValueError(f"karras rho must be a positive number, got {self.rho}")
        if self.ays not in AYS_SIGMAS:
            raise ValueError(f"unknown AYS table {self.ays!r}; valid: {', '.join(AYS_SIGMAS)}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")


def valid_spacings(spec: ModelSpec) -> tuple[str, ...]:
    """The spacing names that make sense for ``spec``'s schedule."""
    return _VALID[spec.schedule.kind]


def as_spacing(spacing: "str | Spacing | Sequence[float]", spec: ModelSpec) -> Spacing:
    """Normalize ``spacing`` (a name, a Spacing, or an explicit decreasing list of timesteps) for ``spec``."""
    if isinstance(spacing, Spacing):
        sp = spacing
    elif isinstance(spacing, str):
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
        if spacing in ("timesteps", "sigmas"):
            raise ValueError(f"spacing {spacing!r} needs values: pass Spacing({spacing!r}, values=[...])")
        sp = Spacing(spacing)
    elif isinstance(spacing, (list, tuple, np.ndarray)):
        sp = Spacing("timesteps", values=tuple(spacing))
    else:
        raise TypeError(
            f"spacing must be a name, a Spacing or a list of timesteps, got {type(spacing).__name__}"
        )
    kind = spec.schedule.kind
    if sp.name not in _VALID[kind]:
        raise ValueError(
            f"spacing {sp.name!r} makes no sense for a {type(spec.schedule).__name__} schedule; "
            f"valid here: {', '.join(_VALID[kind])}"
        )
    return sp


@dataclass(frozen=True)
class Grid:
    """``points[0..n]``: the sampler steps from ``points[i]`` to ``points[i + 1]``; ``points[n]`` is the
    end."""

    points: tuple[Point, ...]
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        # every step but the last must move toward the clean end: a repeated point would be a zero-length
        # step in the middle of a multistep history (step-size ratios divide by it).  The last step may have
        # zero length (karras + final='sigma_min', as diffusers); solvers take it as an exact identity.
        lam = [p.lam for p in self.points]
        for i in range(len(lam) - 2):
            if not lam[i] < lam[i + 1]:
                raise ValueError(
                    f"grid point {i + 1} (sigma={self.points[i + 1].sigma_tilde:.6g}, time="
                    f"{self.points[i + 1].model_time:g}) does not move past point {i} (sigma="
                    f"{self.points[i].sigma_tilde:.6g}): {len(lam) - 1} steps need distinct noise levels"
                )
        if len(lam) >= 2 and lam[-1] < lam[-2]:
            raise ValueError(f"the grid's end (sigma={self.points[-1].sigma_tilde:.6g}) is noisier than its "
                             f"last point (sigma={self.points[-2].sigma_tilde:.6g})")

    @property
    def n(self) -> int:
        return len(self.points) - 1

    @property
    def sigmas_tilde(self) -> np.ndarray:
        return np.array([p.sigma_tilde for p in self.points])

    @property
    def model_times(self) -> np.ndarray:
        return np.array([p.model_time for p in self.points])


# -- sigma-space spacings (shared by every family) ---------------------------------------------------------
def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: ``n`` sigmas from sigma_max to sigma_min, uniform in ``sigma^(1/rho)``."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """``n`` sigmas uniform in log-sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Lee et al. 2024 ("Beta sampling is all you need"): sigmas at the quantiles of a Beta(a, b)."""
    try:
        from scipy.special import betaincinv
    except ImportError as e:  # pragma: no cover - scipy is a dependency
        raise ImportError("the 'beta' spacing needs scipy (pip install scipy)") from e
    q = 1 - np.linspace(0, 1, n)
    return sigma_min + betaincinv(a, b, q) * (sigma_max - sigma_min)


def loglinear_interp(values: Sequence[float], n: int) -> np.ndarray:
    """Resample a decreasing positive schedule to ``n`` values, linearly in log space (AYS paper, App. C)."""
    xs = np.linspace(0, 1, len(values))
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])
    new = np.interp(np.linspace(0, 1, n), xs, ys)
    return np.exp(new)[::-1].copy()


def ays_sigmas(table: str, n: int) -> np.ndarray:
    """Align-Your-Steps sigmas for ``n`` steps (``n + 1`` values ending in 0): as published at the table's own
    step count, else log-linearly interpolated."""
    t = AYS_SIGMAS[table]
    body = np.array(t[:-1]) if n == len(t) - 1 else loglinear_interp(t[:-1], n)
    return np.concatenate([body, [0.0]])


def ays_timesteps(table: str, n: int, num_train_timesteps: int) -> tuple[int, ...] | None:
    """The published Align-Your-Steps timesteps for ``n`` steps of a ``num_train_timesteps``-step schedule,
    or None where there are none (SVD, another step count or schedule length: use :func:`ays_sigmas`)."""
    ts = AYS_TIMESTEPS.get(table)
    if ts is None or n != len(ts) or num_train_timesteps != AYS_TRAIN_TIMESTEPS:
        return None
    return ts


def sigma_spacing(sp: Spacing, smin: float, smax: float, n: int) -> np.ndarray:
    if sp.name == "karras":
        return karras_sigmas(smin, smax, n, sp.rho)
    if sp.name == "exponential":
        return exponential_sigmas(smin, smax, n)
    if sp.name == "beta":
        return beta_sigmas(smin, smax, n, sp.beta_a, sp.beta_b)
    raise AssertionError(sp.name)


# -- grids ------------------------------------------------------------------------------------------------
def make_grid(
    spec: ModelSpec, spacing: Spacing, n: int, *, family: str = "multistep", final: str = "zero"
) -> Grid:
    """Build a grid of ``n`` steps (``n + 1`` points) for ``spec``.

    family: "multistep" or "euler" (see the module docstring); final: "zero" (end at sigma = 0) or
    "sigma_min" (end at the schedule's smallest sigma).
    """
    if n < 1:
        raise ValueError(f"a grid needs at least one step, got n={n}")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    if family not in ("multistep", "euler"):
        raise ValueError(f"unknown grid family {family!r}")
    sched = spec.schedule
    if isinstance(sched, DiscreteVP):
        return _vp_grid(spec, sched, spacing, n, family, final)
    if isinstance(sched, EDM):
        return _edm_grid(sched, spacing, n, final)
    return _flow_grid(sched, spacing, n, final)


def _vp_timesteps(sched: DiscreteVP, sp: Spacing, n: int, family: str) -> np.ndarray:
    T = sched.num_train_timesteps
    if family == "multistep":
        if sp.name == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64).astype(np.float64)
        if sp.name == "leading":
            ratio = T // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + float(sp.steps_offset)
        ratio = T / n
        return np.arange(T, 0, -ratio).round().astype(np.int64) - 1.0
    if sp.name == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    if sp.name == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float32) + float(sp.steps_offset)
    ratio = T / n
    return np.arange(T, 0, -ratio).round().astype(np.float32) - 1.0


def _vp_grid(spec, sched: DiscreteVP, sp: Spacing, n: int, family: str, final: str) -> Grid:
    # multistep family: diffusers' float32 sigma table, so even a zero-length last step (karras + sigma_min)
    # is exactly zero-length, as SDE noise ~ sqrt(h) would show a one-ulp difference
    table = f32_sigmas(sched).astype(np.float64) if family == "multistep" else sched.sigmas_tilde
    sigma_last = 0.0 if final == "zero" else float(table[0])
    # AYS at its own step count: the published timesteps, as for an explicit list
    published = ays_timesteps(sp.ays, n, sched.num_train_timesteps) if sp.name == "ays" else None
    if sp.name in _TIMESTEP_SPACINGS:
        ts = _vp_timesteps(sched, sp, n, family)
        if ts.max() > sched.num_train_timesteps - 1 or ts.min() < 0:
            raise ValueError(
                f"{sp.name} spacing with steps_offset={sp.steps_offset} gives timesteps {ts.tolist()} "
                f"outside "
                f"[0, {sched.num_train_timesteps - 1}]"
            )
        sig = np.interp(ts, np.arange(len(table)), table)
    elif sp.name == "timesteps" or published is not None:
        ts = np.array(published or sp.values, dtype=np.float64)
        if ts.max() > sched.num_train_timesteps - 1:
            raise ValueError(f"timesteps must lie in [0, {sched.num_train_timesteps - 1}], got {ts.tolist()}")
        if len(ts) != n:
            raise ValueError(f"{len(ts)} explicit timesteps given for {n} steps")
        sig = np.interp(ts, np.arange(len(table)), table)
    else:
        if sp.name == "sigmas":
            vals = np.array(sp.values, dtype=np.float64)
            if len(vals) != n + 1:
                raise ValueError(
                    f"{len(vals)} explicit sigmas given; {n} steps need {n + 1} (the last is the end)"
                )
            sig, sigma_last = vals[:-1], float(vals[-1])
        elif sp.name == "ays":
            vals = ays_sigmas(sp.ays, n)
            sig = vals[:-1]
        elif family == "multistep":
            sig = sigma_spacing(sp, float(table[0]), float(table[-1]), n)
        else:  # euler family: the range comes from the linspace-interpolated sigmas (diffusers' behaviour)
            ts0 = _vp_timesteps(sched, Spacing("linspace"), n, "euler")
            base = np.interp(ts0, np.arange(len(table)), table)
            sig = sigma_spacing(sp, float(base[-1]), float(base[0]), n)
        ts = sched.timesteps_of_sigmas(sig)
        if family == "multistep" and sched.beta_schedule != "squaredcos_cap_v2":
            if sp.name in ("exponential", "beta"):
                # diffusers' multistep schedulers round karras timesteps, but exponential / beta ones only
                # meet set_timesteps' int64 cast, which truncates: float32 logs then matter (sigma_max ->
                # t = 998.9999998 -> 998)
                ts = np.floor(f32_sigma_to_t(sched, sig))
            else:
                ts = ts.round()
    sig32 = np.concatenate([sig, [sigma_last]]).astype(np.float32).astype(np.float64)
    times = list(ts) + [0.0]
    pts = tuple(sched.point_at_sigma(float(s), float(t)) for s, t in zip(sig32, times))
    return Grid(pts, {"spacing": sp.name, "family": family})


def f32_sigmas(sched: DiscreteVP) -> np.ndarray:
    """The sigma table as diffusers' multistep set_timesteps holds it: float32 ``((1 - a) / a) ** 0.5``."""
    import torch

    ac = torch.from_numpy(sched.alphas_cumprod.astype(np.float32))
    return (((1 - ac) / ac) ** 0.5).numpy()


def f32_sigma_to_t(sched: DiscreteVP, sig: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t`` on its float32 log-sigma table, bit for bit (needed where t is cut)."""
    log_sigmas = np.log(f32_sigmas(sched))
    log_sigma = np.log(np.maximum(np.asarray(sig, dtype=np.float64), 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * (low_idx + 1)


def _edm_grid(sched: EDM, sp: Spacing, n: int, final: str) -> Grid:
    if sp.name == "sigmas":
        vals = np.array(sp.values, dtype=np.float64)
        if len(vals) != n + 1:
            raise ValueError(
                f"{len(vals)} explicit sigmas given; {n} steps need {n + 1} (the last is the end)"
            )
    elif sp.name == "ays":
        vals = ays_sigmas(sp.ays, n)
    else:
        vals = np.concatenate([sigma_spacing(sp, sched.sigma_min, sched.sigma_max, n), [0.0]])
    if final == "sigma_min" and vals[-1] == 0.0:
        vals[-1] = sched.sigma_min
    return Grid(tuple(sched.point_at_sigma(float(s)) for s in vals), {"spacing": sp.name})


def _flow_grid(sched: Flow, sp: Spacing, n: int, final: str) -> Grid:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(n) (what SD3 / Flux pipelines run).

    With a static ``shift`` the scheduler's float32 sigma table is already shifted when set_timesteps spaces
    ``linspace(max, min)`` and shifts again, so the last sigma is ``shift(shift(1 / T))``, not
    ``shift(1 / T)``; with dynamic shifting (``Flow(mu=...)``) the table is unshifted and ``mu`` is applied
    once.  karras / exponential / beta respace that range.
    """
    import torch

    T = sched.num_train_timesteps
    if sp.name == "timesteps":
        ts = np.array(sp.values) / T
        if len(ts) != n:
            raise ValueError(f"{len(ts)} explicit timesteps given for {n} steps")
    elif sp.name == "sigmas":
        vals = np.array(sp.values, dtype=np.float64)
        if len(vals) != n + 1:
            raise ValueError(
                f"{len(vals)} explicit sigmas given; {n} steps need {n + 1} (the last is the end)"
            )
        return Grid(tuple(sched.point_at_t(float(t)) for t in vals), {"spacing": sp.name})
    else:
        table = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
        if sched.mu is None:
            table = _flow_shift(sched, table)
        t_max, t_min = table[0].item(), table[-1].item()
        ts = _flow_shift(sched, np.linspace(t_max * T, t_min * T, n) / T)
        if sp.name not in ("flow", "linspace"):
            ts = sigma_spacing(sp, float(ts[-1]), float(ts[0]), n)
    if np.any(ts > 1) or np.any(ts <= 0):
        raise ValueError(f"flow times must lie in (0, 1], got {ts.tolist()}")
    last = 0.0 if final == "zero" else 1.0 / T
    vals = np.concatenate([ts, [last]]).astype(np.float32).astype(np.float64)
    return Grid(tuple(sched.point_at_t(float(t)) for t in vals), {"spacing": sp.name, "family": "flow"})


def _flow_shift(sched: Flow, t):
    """The time shift on arrays or tensors, with diffusers' operation order (float32 tables stay float32)."""
    if sched.mu is not None:
        return math.exp(sched.mu) / (math.exp(sched.mu) + (1.0 / t - 1.0))
    return sched.shift * t / (1.0 + (sched.shift - 1.0) * t)
