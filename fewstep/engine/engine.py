"""Engine: one Plan per input shape, built on first use, kept in an LRU cache (CUDA graphs share one pool)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..solvers import ModelSpec, build
from .plan import Plan

__all__ = ["Engine"]

_PER_CALL = ("shape", "device", "cond", "graph_pool")


class Engine:
    """``fs.Engine(model, spec, solver=..., nfe=..., max_plans=8, **compile_options)``; call as
    ``engine(noise, seed=None, generator=None, **cond)``.

    A new (noise shape, device, conditioning shapes/dtypes) builds a new plan (warm-up + graph capture, not a
    new solver build); the least recently used plan is dropped beyond ``max_plans``.  Plans on CUDA share one
    graph memory pool, so they must be called from one stream at a time.
    """

    def __init__(self, model: Callable[..., torch.Tensor], spec: ModelSpec, *, solver: str, nfe: int,
                 max_plans: int = 8, spacing: Any = None, guidance_scale: float | None = None,
                 quant: str | None = None, quant_options: dict | None = None, **options: Any):
        if isinstance(max_plans, bool) or not isinstance(max_plans, int) or max_plans < 1:
            raise ValueError(f"max_plans must be an int >= 1, got {max_plans!r}")
        bad = sorted(set(options) & set(_PER_CALL))
        if bad:
            raise ValueError(f"Engine takes {bad} from each call's inputs; do not pass them to Engine()")
        plan_keys = {"dtype", "cuda_graph", "check_finite", "compile_network", "kernels", "record_noise"}
        self._plan_options = {k: v for k, v in options.items() if k in plan_keys}
        solver_options = {k: v for k, v in options.items() if k not in plan_keys}
        self.program = build(solver, spec, nfe, spacing, guidance_scale=guidance_scale, **solver_options)
        if quant is None and quant_options:
            raise ValueError("quant_options given without quant=; pass quant='fp8' or 'fp8-emulated'")
        if quant is not None:
            from ..quant import check_mode

            check_mode(quant)  # an unknown mode fails here, not at the first call
        self.quant, self.quant_options = quant, dict(quant_options or {})
        self.model, self.max_plans = model, max_plans
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._pool = None

    @property
    def plans(self) -> list[Plan]:
        """The cached plans, least recently used first."""
        return list(self._plans.values())

    def plan_for(self, noise: torch.Tensor, **cond: torch.Tensor) -> Plan:
        """The plan for these inputs, built on first use."""
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        for k, v in cond.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"cond[{k!r}] must be a tensor, got {type(v).__name__}")
        key = (tuple(noise.shape), str(noise.device),
               tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in sorted(cond.items())))
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        if noise.device.type == "cuda" and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        kw = dict(shape=noise.shape, device=noise.device, cond=cond,
                  graph_pool=self._pool if noise.device.type == "cuda" else None, **self._plan_options)
        quant_structure = None
        if self.quant is not None:  # the network is quantized once; static scales are calibrated per shape
            from .quantized import quantize_for_plan

            quant_structure = quantize_for_plan(self.model, self.quant, self.program, kw, self.quant_options)
        plan = Plan(self.model, self.program, **kw, quant_structure=quant_structure)
        self._plans[key] = plan  # only a fully built plan is cached: a failed build leaves nothing behind
        while len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)
        return plan

    def __call__(self, noise: torch.Tensor, *, seed: int | None = None,
                 generator: torch.Generator | None = None, copy: bool = True,
                 **cond: torch.Tensor) -> torch.Tensor:
        return self.plan_for(noise, **cond)(noise, seed=seed, generator=generator, copy=copy, **cond)

    def clear(self) -> None:
        """Drop every cached plan."""
        self._plans.clear()
