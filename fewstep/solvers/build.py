"""``fs.solvers.build``: validate the request, check the nfe against what the grid allows, run the solver."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .diffusers_map import resolve
from .grids import NFE_MAX
from .program import StepProgram
from .registry import BuildContext, get
from .spacing import Spacing
from .spec import ModelSpec

__all__ = ["build", "max_nfe"]


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
    [uncond; cond] halves. options: the solver's options dataclass fields (``fs.solvers.get(name).options``);
    unset ones default to the spec's diffusers config where it came from this solver's own diffusers
    scheduler (``fewstep/solvers/diffusers_map.py``), else to the dataclass defaults.

    nfe is at most :func:`max_nfe` (checked before anything is built): ``NFE_MAX`` = 1000, or fewer where the
    grid runs out of distinct timesteps (integer-timestep spacings of a DiscreteVP schedule, distillation
    grids, explicit lists).
    """
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
    info, sp, opts = resolve(name, spec, spacing, options)
    ctx = BuildContext(name, spec, nfe, sp, guidance_scale)
    limit, why = _limit(ctx, opts)
    if nfe > limit:
        raise ValueError(f"nfe={nfe} is too large for {name} with {sp.name} spacing on {spec.describe()}: "
                         f"the largest valid nfe is {limit} ({why})")
    prog = info.fn(ctx, opts)
    if prog.nfe != nfe:
        raise AssertionError(f"{name} built {prog.nfe} network calls for nfe={nfe}")
    return prog


def max_nfe(name: str, spec: ModelSpec, spacing: "str | Spacing | Sequence[float] | None" = None,
            **options: Any) -> int:
    """The largest nfe ``build(name, spec, nfe, spacing, **options)`` accepts (cheap: nothing is built)."""
    _, sp, opts = resolve(name, spec, spacing, options)
    return _limit(BuildContext(name, spec, 1, sp, None), opts)[0]


def _limit(ctx: BuildContext, opts: Any) -> tuple[int, str]:
    lim = get(ctx.name).max_nfe(ctx, opts)
    if lim is None or lim[0] > NFE_MAX:
        return NFE_MAX, f"fewstep builds at most NFE_MAX={NFE_MAX} network calls"
    return lim
