"""Scheduler-specific grids: the points a particular diffusers scheduler visits where it departs from the
generic families of :func:`fewstep.solvers.spacing.make_grid`.

Each function reproduces one scheduler's ``set_timesteps`` (named in its docstring), including its float32
rounding, so the solvers that use it keep diffusers parity.  Solvers import their grids from here; no solver
module imports another.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .schedules import EDM, DiscreteVP, Flow, Point
from .spacing import Grid, Spacing, f32_sigma_to_t, f32_sigmas, sigma_spacing
from .spec import ModelSpec

if TYPE_CHECKING:
    from .registry import BuildContext

__all__ = [
    "NFE_MAX",
    "NfeLimit",
    "grid_step_limit",
    "timestep_step_limit",
    "DDIM_SPACINGS",
    "ddim_timesteps",
    "lcm_timesteps",
    "distilled_timesteps",
    "consistency_timesteps_grid",
    "flow_multistep_grid",
    "dpm_grid",
    "diffusers_multistep_grid",
    "unipc_flow_grid",
    "deis_grid",
    "deis_step_limit",
    "ipndm_grid",
    "flow_match_grid",
]

DDIM_SPACINGS = ("linspace", "leading", "trailing")

# fewstep is a low-NFE engine: no sampler it ships needs more calls, and a 1000-call program still builds in
# well under a second; grids on integer timesteps may allow fewer (see grid_step_limit)
NFE_MAX = 1000

NfeLimit = tuple[int, str]
"""The largest nfe (or number of grid steps) allowed, and why."""


# -- how many steps a grid has distinct points for ---------------------------------------------------------
def grid_step_limit(spec: ModelSpec, sp: Spacing, family: str) -> NfeLimit | None:
    """The most steps ``make_grid(spec, sp, n, family=family)`` gives distinct points for; None where the
    grid is continuous (only NFE_MAX bounds it).  Cheap: integer arithmetic, no grid is built.  Explicit lists
    give exactly their length; integer timesteps are counted by :func:`timestep_step_limit`."""
    if sp.name == "timesteps":
        return len(sp.values), f"the explicit list has {len(sp.values)} timesteps"
    if sp.name == "sigmas":
        return len(sp.values) - 1, f"the explicit list has {len(sp.values)} sigmas (the last is the end)"
    sched = spec.schedule
    if not isinstance(sched, DiscreteVP):
        return None
    return timestep_step_limit(sched.num_train_timesteps, sp, family)


def timestep_step_limit(num_train_timesteps: int, sp: Spacing, family: str) -> NfeLimit | None:
    """The most steps an integer-timestep spacing of a T-step schedule has distinct timesteps in [0, T - 1]
    for; None for other spacings.

    family "multistep" spaces ``n + 1`` timesteps and drops the last (linspace, leading: at most T - 1 steps;
    trailing: T); "euler" spaces ``n`` (leading, trailing: T; its linspace is fractional, so None); "ddim"
    spaces ``n`` rounded to integers (T).  steps_offset shifts leading timesteps up and can push the top one,
    ``(k - 1) * (T // k) + offset`` with ``k`` timesteps spaced, past T - 1.
    """
    if sp.name not in DDIM_SPACINGS or (family == "euler" and sp.name == "linspace"):
        return None
    T, off = num_train_timesteps, sp.steps_offset
    extra = 1 if family == "multistep" else 0  # timesteps spaced beyond the n kept
    n = T if sp.name == "trailing" else T - extra
    if sp.name == "leading":
        while n > 0 and (n + extra - 1) * (T // (n + extra)) + off > T - 1:
            n -= 1
    which = f"{sp.name} spacing" + (f" with steps_offset={off}" if sp.name == "leading" and off else "")
    return n, f"the {which} gives distinct timesteps in [0, {T - 1}] for at most {n} steps"


# -- integer-timestep schedulers (DDIM, LCM, TCD) ------------------------------------------------------------
def ddim_timesteps(num_train_timesteps: int, n: int, spacing: Spacing) -> np.ndarray:
    """DDIMScheduler.set_timesteps: ``n`` integer timesteps (linspace / leading + steps_offset / trailing)."""
    T = num_train_timesteps
    if n > T:
        raise ValueError(f"ddim: nfe={n} is larger than num_train_timesteps={T}")
    if spacing.name == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif spacing.name == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + spacing.steps_offset
    elif spacing.name == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"ddim supports the spacings {', '.join(DDIM_SPACINGS)} (DDIMScheduler's own); got "
                         f"{spacing.name!r} (use dpmpp_2m with order=1 for other grids)")
    if len(ts) != n or ts.max() > T - 1 or ts.min() < 0:
        raise ValueError(f"ddim: {spacing.name} spacing (steps_offset={spacing.steps_offset}) gives "
                         f"timesteps {ts.tolist()}, expected {n} in [0, {T - 1}]")
    return ts


def lcm_timesteps(num_train_timesteps: int, original_steps: int, n: int) -> np.ndarray:
    """LCMScheduler / TCDScheduler.set_timesteps(n): ``n`` of the ``original_steps`` distilled timesteps."""
    T = num_train_timesteps
    if original_steps > T:
        raise ValueError(f"original_inference_steps={original_steps} exceeds num_train_timesteps={T}")
    if n > original_steps:
        raise ValueError(f"nfe={n} exceeds original_inference_steps={original_steps}: the timesteps are "
                         f"picked from that grid, so valid nfe are 1..{original_steps}")
    origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    return origin[np.floor(np.linspace(0, original_steps, num=n, endpoint=False)).astype(np.int64)]


def distilled_timesteps(ctx: BuildContext, sched: DiscreteVP, original_steps: int) -> list[int]:
    """The timesteps LCM / TCD visit: their own selection, or an explicit ``spacing=[...]`` of integers."""
    sp = ctx.spacing
    if sp.name == "timesteps":
        ts = list(sp.values)
        if len(ts) != ctx.nfe or any(t != int(t) for t in ts) or max(ts) > sched.num_train_timesteps - 1:
            raise ValueError(f"{ctx.name}: explicit timesteps must be {ctx.nfe} integers in "
                             f"[0, {sched.num_train_timesteps - 1}], got {ts}")
        return [int(t) for t in ts]
    if sp.name not in ("linspace", "leading", "trailing"):
        raise ValueError(f"{ctx.name} picks its own timesteps from the distillation grid (as diffusers' "
                         f"scheduler does); spacing {sp.name!r} does not apply (pass explicit timesteps)")
    return [int(t) for t in lcm_timesteps(sched.num_train_timesteps, original_steps, ctx.nfe)]


def consistency_timesteps_grid(sched: EDM, n: int, train_steps: int, rho: float, final: str) -> Grid:
    """CMStochasticIterativeScheduler.set_timesteps(n): every (N // n)-th sigma of the N-point Karras grid."""
    if n > train_steps:
        raise ValueError(f"nfe={n} exceeds train_steps={train_steps}: the grid is a subset of the "
                         f"{train_steps}-point training discretization, so valid nfe are 1..{train_steps}")
    ramp = np.arange(0, n) * (train_steps // n) / (train_steps - 1)
    lo, hi = sched.sigma_min ** (1 / rho), sched.sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    end = 0.0 if final == "zero" else sched.sigma_min
    vals = np.concatenate([sig, [end]]).astype(np.float32).astype(np.float64)
    return Grid(tuple(sched.point_at_sigma(float(s)) for s in vals), {"spacing": "consistency"})


# -- multistep schedulers (DPMSolver, UniPC, DEIS) and iPNDM -------------------------------------------------
def flow_multistep_grid(sched: Flow, n: int, final: str = "zero") -> Grid:
    """The grid of diffusers' multistep schedulers with ``use_flow_sigmas=True`` (DPMSolver, UniPC): ``n``
    shifted times from ``1 - 1/T`` (not 1, so lambda stays finite) down to ``(1 - 1/T) / n``; the network gets
    the truncated integer ``int(t * T)``.  final: "zero" ends at t = 0, "sigma_min" at t = 1/T."""
    T = sched.num_train_timesteps
    raw = (1.0 - np.linspace(1.0, 1.0 / T, n + 1))[::-1][:-1]  # diffusers' exact arithmetic (t is truncated)
    ts = np.array([sched.shift_t(float(t)) for t in raw])
    sig32 = np.concatenate([ts, [0.0 if final == "zero" else 1.0 / T]]).astype(np.float32).astype(np.float64)
    times = list(np.floor(ts * T)) + [0.0]
    return Grid(tuple(sched.point_at_t(float(s), float(m)) for s, m in zip(sig32, times)),
                {"spacing": "flow", "family": "multistep"})


def dpm_grid(ctx: BuildContext, final: str) -> Grid:
    """DPMSolverMultistep / Singlestep: the multistep-family grid, except diffusers' ``use_flow_sigmas`` grid
    for flow schedules."""
    if isinstance(ctx.spec.schedule, Flow) and ctx.spacing.name in ("flow", "linspace"):
        return flow_multistep_grid(ctx.spec.schedule, ctx.nfe, final)
    return ctx.grid(ctx.nfe, family="multistep", final=final)


def diffusers_multistep_grid(ctx: BuildContext, n: int, final: str) -> Grid:
    """The multistep grid as UniPC / DEIS build it.  It differs from DPMSolverMultistep's (spacing.py's
    "multistep" family) only for VP sigma spacings with ``squaredcos_cap_v2`` betas, where UniPC / DEIS still
    round karras timesteps; we recompute every VP sigma-spacing time the UniPC way: karras rounded,
    exponential / beta truncated (diffusers' int64 cast), from diffusers' float32 log-sigma table."""
    grid = ctx.grid(n, family="multistep", final=final)
    sched, sp = ctx.spec.schedule, ctx.spacing
    if not isinstance(sched, DiscreteVP) or sp.name not in ("karras", "exponential", "beta"):
        return grid
    table = f32_sigmas(sched)
    t = f32_sigma_to_t(sched, sigma_spacing(sp, float(table[0]), float(table[-1]), n))
    t = np.round(t) if sp.name == "karras" else np.floor(t)
    pts = [sched.point_at_sigma(p.sigma_tilde, float(ti)) for p, ti in zip(grid.points[:-1], t)]
    return Grid(tuple(pts) + (grid.points[-1],), grid.meta)


def unipc_flow_grid(sched: Flow, n: int, final: str) -> Grid:
    """UniPCMultistepScheduler's flow grid (use_flow_sigmas): ``n`` shifted points of
    ``linspace(1, 1 / T, n + 1)``, the first moved 1e-6 below pure noise, network time ``int(t * T)``."""
    T = sched.num_train_timesteps
    t = np.array([sched.shift_t(float(v)) for v in np.linspace(1, 1 / T, n + 1)[:-1]])
    if abs(t[0] - 1) < 1e-6:
        t[0] -= 1e-6
    times = np.trunc(t * T)
    t = np.concatenate([t, [0.0 if final == "zero" else t[-1]]]).astype(np.float32).astype(np.float64)
    return Grid(tuple(sched.point_at_t(float(v), float(m)) for v, m in zip(t, list(times) + [0.0])),
                {"spacing": "flow"})


def deis_grid(ctx: BuildContext, n: int, final: str) -> Grid:
    """diffusers' DEIS grid without its repeated last sigma.  With a sigma spacing diffusers appends a copy of
    the last sigma, so its last step goes nowhere and its last network call is wasted.  Where the grid would
    end on a repeated point we space ``n + 1`` distinct points down to that same end instead: every call is
    used, and the result is diffusers' with ``n + 1`` steps."""
    grid = diffusers_multistep_grid(ctx, n, final)
    if not ends_on_repeated_point(grid):
        return grid
    longer = diffusers_multistep_grid(ctx, n + 1, final)
    return Grid(longer.points[:-1], longer.meta)


def deis_step_limit(ctx: BuildContext, final: str) -> NfeLimit | None:
    """The most steps :func:`deis_grid` has distinct points for: one more is spaced where the grid would end
    on a repeated point, which on integer timesteps is trailing + final='sigma_min' (it reaches timestep 0,
    the end)."""
    lim = grid_step_limit(ctx.spec, ctx.spacing, "multistep")
    if lim is not None and final == "sigma_min" and ctx.spacing.name == "trailing":
        return lim[0] - 1, f"{lim[1]}, and {ctx.name} spaces one more so as not to repeat the end"
    return lim


def ends_on_repeated_point(grid: Grid) -> bool:
    """Whether the last step of ``grid`` has zero length (karras + final='sigma_min' and the like)."""
    return grid.n >= 1 and math.isclose(grid.points[-1].sigma_tilde, grid.points[-2].sigma_tilde,
                                        rel_tol=1e-12)


def ipndm_grid(n: int) -> Grid:
    """diffusers' IPNDMScheduler grid, in float32 as it computes it: ``s = linspace(1, 0, n + 1)``,
    ``sigma = sin(pi s / 2)^2``, ``alpha = sqrt(1 - sigma^2)``; the network receives the v-diffusion time
    ``(2 / pi) atan2(sigma, alpha)`` in [0, 1].  The first point is pure noise (alpha = 0)."""
    import torch

    s = torch.cat([torch.linspace(1, 0, n + 1)[:-1], torch.tensor([0.0])])
    sigma = torch.sin(s * math.pi / 2) ** 2
    alpha = (1.0 - sigma**2) ** 0.5
    t = torch.atan2(sigma, alpha) / math.pi * 2
    return Grid(tuple(Point(float(a), float(sg), float(tt)) for a, sg, tt in zip(alpha, sigma, t)),
                {"spacing": "ipndm"})


# -- flow matching -------------------------------------------------------------------------------------------
def flow_match_grid(ctx: BuildContext, n: int, final: str = "zero") -> Grid:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(n): spacing.py's flow grid, which reproduces it."""
    sched = ctx.spec.schedule
    if not isinstance(sched, Flow):
        raise ValueError(
            f"{ctx.name} needs a Flow schedule (rectified flow: SD3 / Flux), got {type(sched).__name__}; "
            f"use {'heun' if 'heun' in ctx.name else 'euler'} for other schedules"
        )
    grid = ctx.grid(n, family="euler", final=final)
    if ctx.spec.prediction == "epsilon" and grid.points[0].sigma >= 1.0:
        raise ValueError(f"{ctx.name}: an epsilon-prediction network carries no x0 information at t = 1 "
                         f"(pure noise), where this grid starts; use a flow or sample prediction spec")
    return grid
