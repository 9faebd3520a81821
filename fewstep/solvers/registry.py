"""One registry of solvers: ``@register`` records a solver function with its options class and metadata;
``get`` / ``available`` look them up.  Every solver module is imported once, by name, in ``__init__.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .grids import NfeLimit, grid_step_limit
from .program import ProgramBuilder, StepProgram
from .spacing import Grid, Spacing, make_grid
from .spec import ModelSpec

__all__ = ["register", "available", "get", "BuildContext", "CommonOptions", "SolverInfo"]



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
    """A registered solver: its function, options dataclass and metadata (see :func:`register`)."""

    name: str
    fn: Callable[[BuildContext, Any], StepProgram]
    options: type
    default_spacing: Callable[[ModelSpec], str]
    stochastic: "bool | Callable[[Any], bool]"
    nominal_order: Callable[[Any], int | None]
    max_nfe: Callable[[BuildContext, Any], NfeLimit | None]

    def is_stochastic(self, opts: Any) -> bool:
        s = self.stochastic
        return bool(s(opts)) if callable(s) else bool(s)

    def make_options(self, options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Any:
        """The options dataclass from ``options`` (names checked), over ``defaults`` (values from elsewhere,
        e.g. a diffusers config; named in the error when they are what fails)."""
        fields = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {unknown}; valid options: {sorted(fields)}")
        merged = {k: v for k, v in (defaults or {}).items() if k in fields}
        merged.update(options)
        try:
            return self.options(**merged)
        except ValueError as e:
            taken = {k: v for k, v in merged.items() if k not in options}
            if not taken:
                raise
            raise ValueError(f"{e} (with {taken} taken from the spec's diffusers config; pass the option to "
                             f"override it)") from e

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


def _multistep_max_nfe(ctx: BuildContext, opts: Any) -> NfeLimit | None:
    return grid_step_limit(ctx.spec, ctx.spacing, "multistep")


def register(
    name: str,
    options: type = CommonOptions,
    *,
    stochastic: "bool | Callable[[Any], bool]" = False,
    order: "int | Callable[[Any], int | None] | None" = None,
    default_spacing: Callable[[ModelSpec], str] = _default_spacing,
    max_nfe: Callable[[BuildContext, Any], NfeLimit | None] = _multistep_max_nfe,
):
    """Decorator: ``@register("dpmpp_2m", DPMOptions, order=lambda o: o.order)`` on
    ``fn(ctx: BuildContext, opts) -> StepProgram``.

    stochastic: whether the sampler draws noise (a bool, or a function of the options, e.g. DDIM's eta > 0).
    order: the nominal convergence order on the probability-flow ODE (int or function of the options; None for
    samplers that are not ODE solvers).  max_nfe: ``fn(ctx, opts) -> (largest nfe, why) | None``, what the
    solver's grid allows on ``ctx.spec`` with ``ctx.spacing`` (None: no bound below ``fs.solvers.NFE_MAX``);
    it must be cheap, as ``build`` checks it before building anything.  The default is one call per step of
    the multistep grid.  The diffusers equivalent, if any, is declared in ``diffusers_map.py``.
    """

    def deco(fn):
        if name in _REGISTRY:
            raise RuntimeError(f"solver {name!r} registered twice")
        order_fn = order if callable(order) else (lambda o, _k=order: _k)
        _REGISTRY[name] = SolverInfo(name, fn, options, default_spacing, stochastic, order_fn, max_nfe)
        return fn

    return deco


def available() -> list[str]:
    """Names of every registered solver."""
    return sorted(_REGISTRY)


def get(name: str) -> SolverInfo:
    """The registered solver ``name``; ValueError listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
