"""Engine: one Plan per input shape, built on first use, kept in an LRU cache (CUDA graphs share one pool)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..quant.config import QuantConfig, quant_config
from ..solvers import ModelSpec
from ..solvers.tuning import Tuned, program_for
from . import quantized
from .api import split_options
from .config import PlanConfig, plan_config
from .plan import Plan, check_required_cond

__all__ = ["Engine"]

_PER_CALL = ("shape", "device", "cond", "graph_pool")


class Engine:
    """``fs.Engine(model, spec, solver=..., nfe=..., max_plans=8, config=None, quant=None, **options)``; call
    as ``engine(noise, seed=None, generator=None, copy=True, **cond)``.  Options are ``fs.compile``'s (the
    plan options as ``config=PlanConfig(...)`` or keywords, quant / quant_options, solver options), less the
    ones each call brings (shape and device from the noise, conditioning from the keywords).

    A new (noise shape, device, conditioning shapes/dtypes) builds a new plan (warm-up + graph capture, not a
    new solver build); the least recently used plan is dropped beyond ``max_plans``.

    Threads: an Engine may be called from many threads at once.  Its cache is guarded by a lock that is never
    held while a plan builds or runs; a plan for a new shape is built once, by the first thread that asks
    (others asking for that shape wait for it, others still run other shapes); each plan serializes its own
    calls (a lock per plan), so calls on one shape run one after another and calls on different shapes run in
    parallel.  On CUDA the plans share one graph memory pool, which is safe because no two of them ever
    replay at once: every plan call is enqueued on the device's default stream (see ``fewstep.engine.plan``).
    With quant=..., the network is quantized (and statically calibrated) once, by the first plan.
    """

    def __init__(self, model: Callable[..., torch.Tensor], spec: ModelSpec, *, solver: "str | Tuned",
                 nfe: int, max_plans: int = 8, spacing: Any = None, guidance_scale: float | None = None,
                 config: PlanConfig | None = None, quant: str | QuantConfig | None = None,
                 quant_options: dict | None = None, **options: Any):
        if isinstance(max_plans, bool) or not isinstance(max_plans, int) or max_plans < 1:
            raise ValueError(f"max_plans must be an int >= 1, got {max_plans!r}")
        bad = sorted(set(options) & set(_PER_CALL))
        if bad:
            raise ValueError(f"Engine takes {bad} from each call's inputs; do not pass them to Engine()")
        solver_options, plan_kw = split_options(options)
        self.config = plan_config(config, plan_kw)
        self.quant = quant_config(quant, quant_options)  # an unknown mode fails here, not at the first call
        self.program = program_for(solver, spec, nfe, spacing, guidance_scale=guidance_scale,
                                   **solver_options)
        self.model, self.max_plans = model, max_plans
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._building: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()  # guards _plans, _building, _pool; not held while a plan builds or runs
        self._quant_lock = threading.Lock()  # quantizing / calibrating the shared network, once
        self._pool = None

    @property
    def plans(self) -> list[Plan]:
        """The cached plans, least recently used first."""
        with self._lock:
            return list(self._plans.values())

    def plan_for(self, noise: torch.Tensor, **cond: torch.Tensor) -> Plan:
        """The plan for these inputs, built on first use (once, however many threads ask at the same time)."""
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        for k, v in cond.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"cond[{k!r}] must be a tensor, got {type(v).__name__}")
        key = (tuple(noise.shape), str(noise.device),
               tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in sorted(cond.items())))
        while True:
            with self._lock:
                plan = self._plans.get(key)
                if plan is not None:
                    self._plans.move_to_end(key)
                    return plan
                building = self._building.get(key)
                if building is None:
                    building = self._building[key] = threading.Event()
                    break
            building.wait()  # another thread builds this shape; if its build failed, the loop builds here
        try:
            plan = self._build(noise, cond)
            with self._lock:  # only a fully built plan is cached: a failed build leaves nothing behind
                self._plans[key] = plan
                while len(self._plans) > self.max_plans:
                    self._plans.popitem(last=False)
        finally:
            with self._lock:
                del self._building[key]
            building.set()
        return plan

    def _build(self, noise: torch.Tensor, cond: dict[str, torch.Tensor]) -> Plan:
        pool = None
        if noise.device.type == "cuda":
            with self._lock:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                pool = self._pool
        check_required_cond(self.model, cond)  # before quantizing the model in place
        quant = None
        if self.quant is not None:
            with self._quant_lock:
                quant = quantized.quantize_for_plan(self.model, self.quant, self.program,
                                                    shape=tuple(noise.shape), device=noise.device, cond=cond,
                                                    config=self.config)
        return Plan(self.model, self.program, shape=noise.shape, device=noise.device, cond=cond,
                    config=self.config, graph_pool=pool, quant=quant)

    def __call__(self, noise: torch.Tensor, *, seed: int | None = None,
                 generator: torch.Generator | None = None, copy: bool = True,
                 **cond: torch.Tensor) -> torch.Tensor:
        """Sample with the plan for these inputs (see :meth:`Plan.__call__`; copy=False returns the plan's
        static output, valid only until its next call: use copy=True when several threads call)."""
        return self.plan_for(noise, **cond)(noise, seed=seed, generator=generator, copy=copy, **cond)

    def clear(self) -> None:
        """Drop every cached plan (calls under way keep theirs until they return)."""
        with self._lock:
            self._plans.clear()
