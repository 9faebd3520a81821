"""One registry of solvers; :func:`build` validates everything and returns a StepProgram."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .program import ProgramBuilder, StepProgram
from .spacing import Grid, Spacing, as_spacing, make_grid, valid_spacings
from .spec import ModelSpec

__all__ = [
    "register",
    "available",
    "build",
    "BuildContext",
    "CommonOptions",
    "get",
    "to_diffusers",
    "diffusers_base_config",
]


@dataclass(frozen=True)
class CommonOptions:
    """Options every solver takes.

    final: "zero" ends at sigma = 0 (the clean sample), "sigma_min" at the schedule's smallest sigma.
    lower_order_final: multistep solvers drop to lower order on the last steps when nfe < 15 (diffusers'
    rule). euler_at_final: take the very last step with first-order Euler.
    """

    final: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False

    def __post_init__(self):
        if self.final not in ("zero", "sigma_min"):
            raise ValueError(f"final must be 'zero' or 'sigma_min', got {self.final!r}")


@dataclass(frozen=True)
class BuildContext:
    """What a solver function receives: the spec, NFE, spacing, guidance and helpers for grids and
    builders."""

    name: str
    spec: ModelSpec
    nfe: int
    spacing: Spacing
    guidance_scale: float | None

    def grid(self, n: int, *, family: str = "multistep", final: str = "zero") -> Grid:
        return make_grid(self.spec, self.spacing, n, family=family, final=final)

    def builder(self, options: Any) -> ProgramBuilder:
        opts = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options or {})
        opts["spacing"] = self.spacing.name
        return ProgramBuilder(self.name, self.spec, self.guidance_scale, **opts)


@dataclass(frozen=True)
class SolverInfo:
    name: str
    fn: Callable[[BuildContext, Any], StepProgram]
    options: type
    default_spacing: Callable[[ModelSpec], str]
    stochastic: bool
    nominal_order: Callable[[Any], int | None]
    diffusers: Callable[[Any, Spacing], tuple[str, dict]] | None

    def is_stochastic(self, opts: Any) -> bool:
        s = self.stochastic
        return bool(s(opts)) if callable(s) else bool(s)

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


_REGISTRY: dict[str, SolverInfo] = {}


def _default_spacing(spec: ModelSpec) -> str:
    kind = spec.schedule.kind
    if kind == "flow":
        return "flow"
    if kind == "edm":
        return "karras"
    return "linspace"


def register(
    name: str,
    options: type = CommonOptions,
    *,
    stochastic: "bool | Callable[[Any], bool]" = False,
    order: "int | Callable[[Any], int | None] | None" = None,
    diffusers: Callable[[Any, Spacing], tuple[str, dict]] | None = None,
    default_spacing: Callable[[ModelSpec], str] = _default_spacing,
):
    """Decorator: ``@register("dpmpp_2m", DPMOptions, order=lambda o: o.order)`` on
    ``fn(ctx: BuildContext, opts) -> StepProgram``.

    stochastic: whether the sampler draws noise (a bool, or a function of the options, e.g. DDIM's eta > 0).
    order: the nominal convergence order on the probability-flow ODE (int or function of the options; None for
    samplers that are not ODE solvers).  diffusers: ``fn(opts, spacing) -> (SchedulerClassName, config
    overrides)`` naming the equivalent diffusers scheduler, used by parity tests and ``fewstep accuracy``; an
    override set to None drops that base key (the class has it built in).  ``to_diffusers`` raises rather than
    silently dropping a key the class does not take.
    """

    def deco(fn):
        if name in _REGISTRY:
            raise RuntimeError(f"solver {name!r} registered twice")
        order_fn = order if callable(order) else (lambda o, _k=order: _k)
        _REGISTRY[name] = SolverInfo(name, fn, options, default_spacing, stochastic, order_fn, diffusers)
        return fn

    return deco


def available() -> list[str]:
    """Names of every registered solver."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> SolverInfo:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def spacing_from_diffusers(cfg: dict) -> Spacing | None:
    """The spacing a diffusers scheduler config asks for (karras / exponential / beta flags,
    timestep_spacing)."""
    if cfg.get("use_karras_sigmas"):
        return Spacing("karras")
    if cfg.get("use_exponential_sigmas"):
        return Spacing("exponential")
    if cfg.get("use_beta_sigmas"):
        return Spacing("beta")
    if cfg.get("use_flow_sigmas") or "FlowMatch" in str(cfg.get("_class_name", "")):
        return Spacing("flow")
    ts = cfg.get("timestep_spacing")
    if ts in ("linspace", "leading", "trailing"):
        return Spacing(ts, steps_offset=int(cfg.get("steps_offset", 0) or 0))
    return None


def build(
    name: str,
    spec: ModelSpec,
    nfe: int,
    spacing: "str | Spacing | Sequence[float] | None" = None,
    *,
    guidance_scale: float | None = None,
    **options: Any,
) -> StepProgram:
    """Build solver ``name`` for ``spec`` with ``nfe`` network calls as a float64 StepProgram.

    spacing: a name from ``fs.solvers.SPACINGS``, a :class:`Spacing`, an explicit decreasing list of
    timesteps, or None (the spec's diffusers config if it has one, else the solver's default).
    guidance_scale: None (no classifier-free guidance) or a finite w >= 0; the network is then called on
    [uncond; cond] halves. options: the solver's options dataclass fields (``fs.solvers.get(name).options``).
    """
    info = get(name)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a fs.ModelSpec, got {type(spec).__name__}")
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe must be an int, got {type(nfe).__name__}")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if guidance_scale is not None:
        g = float(guidance_scale)
        if not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (or None), got {guidance_scale}")
        guidance_scale = g
    if spacing is None:  # the spec's diffusers config decides where it has a say, else the solver's default
        cfg = dict(spec.diffusers_config or {})
        sp = spacing_from_diffusers(cfg) if cfg else None
        if sp is not None and sp.name not in valid_spacings(spec):
            sp = None
        if sp is None:
            # old configs (SD1.5's) carry steps_offset without timestep_spacing: keep it for 'leading'
            default = info.default_spacing(spec)
            offset = int(cfg.get("steps_offset", 0) or 0)
            sp = Spacing(default, steps_offset=offset) if default == "leading" else default
        sp = as_spacing(sp, spec)
    else:
        sp = as_spacing(spacing, spec)
    fields = {f.name for f in dataclasses.fields(info.options)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; valid options: {sorted(fields)}")
    opts = info.options(**options)
    ctx = BuildContext(name, spec, nfe, sp, guidance_scale)
    prog = info.fn(ctx, opts)
    if prog.nfe != nfe:
        raise AssertionError(f"{name} built {prog.nfe} network calls for nfe={nfe}")
    return prog


def diffusers_base_config(spec: ModelSpec, spacing: Spacing) -> dict:
    """The diffusers scheduler config keys that describe ``spec`` and ``spacing`` (schedule, prediction,
    grid)."""
    from .schedules import DiscreteVP, Flow

    sched = spec.schedule
    cfg: dict = {}
    if isinstance(sched, DiscreteVP):
        cfg.update(
            num_train_timesteps=sched.num_train_timesteps,
            beta_start=sched.beta_start,
            beta_end=sched.beta_end,
            beta_schedule=sched.beta_schedule,
            rescale_betas_zero_snr=sched.rescale_zero_terminal_snr,
            prediction_type=spec.prediction,
        )
        if sched.trained_betas is not None:
            cfg["trained_betas"] = list(sched.trained_betas)
    elif isinstance(sched, Flow):
        cfg.update(num_train_timesteps=sched.num_train_timesteps, shift=sched.shift)
    else:
        cfg.update(
            sigma_min=sched.sigma_min,
            sigma_max=sched.sigma_max,
            sigma_data=sched.sigma_data,
            prediction_type=spec.prediction,
        )
    if spacing.name in ("linspace", "leading", "trailing"):
        cfg.update(timestep_spacing=spacing.name, steps_offset=spacing.steps_offset)
    elif spacing.name in ("karras", "exponential", "beta"):
        cfg[f"use_{spacing.name}_sigmas"] = True
    return cfg


def to_diffusers(name: str, spec: ModelSpec, spacing: "str | Spacing | None" = None, **options: Any):
    """Instantiate the diffusers scheduler equivalent to ``build(name, spec, nfe, spacing, **options)``.

    Needs diffusers (a test dependency).  Raises ValueError where diffusers has no equivalent.
    """
    import inspect

    import diffusers

    info = get(name)
    if info.diffusers is None:
        raise ValueError(f"solver {name!r} has no diffusers equivalent")
    sp = as_spacing(spacing if spacing is not None else info.default_spacing(spec), spec)
    opts = info.options(**options)
    cls_name, overrides = info.diffusers(opts, sp)
    cls = getattr(diffusers, cls_name)
    cfg = diffusers_base_config(spec, sp)
    if spec.schedule.kind == "flow" and not cls_name.startswith("FlowMatch"):
        # VP-family schedulers run flow models through their use_flow_sigmas mode
        cfg.update(use_flow_sigmas=True, flow_shift=spec.schedule.shift, prediction_type="flow_prediction")
    cfg.update(overrides)
    for k in [k for k, v in overrides.items() if v is None]:  # None: "this class has it built in", drop it
        del cfg[k]
    params = inspect.signature(cls.__init__).parameters
    # keys that carry meaning for this program must be taken, never silently dropped: the solver's own
    # overrides, the spacing flags and the flow mapping (schedule keys a class lacks are simply not its own)
    if sp.name in ("ays", "sigmas", "timesteps"):
        raise ValueError(
            f"{cls_name} has no config for spacing {sp.name!r} (diffusers takes it as "
            f"set_timesteps(timesteps=... / sigmas=...))"
        )
    needed = {k for k in overrides if k in cfg} | {
        k for k in cfg if k.startswith("use_") or k in ("timestep_spacing", "flow_shift")
    }
    if spec.schedule.kind == "vp":
        needed |= {k for k in ("rescale_betas_zero_snr", "trained_betas") if cfg.get(k)}
    if cfg.get("timestep_spacing") == "linspace" and not cfg.get("steps_offset"):
        needed.discard("timestep_spacing")  # a class without the key (DPMSolverSinglestep) spaces linearly
    dropped = sorted(k for k in needed if k not in params and cfg.get(k) not in (None, False))
    if dropped:
        raise ValueError(
            f"{cls_name} takes no {dropped}: no diffusers equivalent of {name} with "
            f"spacing {sp.name!r} on {spec.describe()}"
        )
    return cls(**{k: v for k, v in cfg.items() if k in params})


_LOADED = False


def _load_all() -> None:
    """Import the solver modules so their @register decorators run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil

    from . import __path__ as pkg_path

    for m in pkgutil.iter_modules(pkg_path):
        if m.name.startswith("algo_"):
            importlib.import_module(f"{__package__}.{m.name}")
