"""``PlanConfig``: how a plan runs (dtype, CUDA graph, kernels, checks), one frozen object.

``fs.compile``, ``fs.Engine``, ``Plan`` and plan files all read this one object; the keyword form
``fs.compile(..., dtype=..., cuda_graph=...)`` builds it.  What a plan computes (solver, nfe, spacing,
guidance) is the StepProgram; where it runs (shape, device, conditioning) comes with each plan; quantization
is a :class:`fewstep.quant.QuantConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels.solver_update import KernelConfig
from ._checks import check_float_dtype

__all__ = ["PlanConfig", "PLAN_OPTIONS", "plan_config"]

COMPILE_MODES = (False, True, "default", "max-autotune-no-cudagraphs")
KERNELS = ("auto", "triton", "cuda", "cpp", "torch")
# dtypes a plan file may name (its network dtype and its conditioning tensors)
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class PlanConfig:
    """How a plan runs.  Every field has a safe default; invalid values raise ValueError naming the field."""

    # The network's input dtype (noise, solver state and output stay fp32).  None: the model's parameter
    # dtype when it is a floating-point nn.Module, else float32.
    dtype: torch.dtype | None = None
    # Capture the whole loop (every network call and solver update) in one CUDA graph.  CUDA only: on CPU a
    # plan always runs eagerly.
    cuda_graph: bool = True
    # Count non-finite values of each output and raise FloatingPointError if there are any (one host sync
    # per call).
    check_finite: bool = False
    # torch.compile the network: False, True (= "default") or "max-autotune-no-cudagraphs" (no mode with its
    # own CUDA graphs: the plan captures one graph around everything).  CUDA only; on CPU it warns and runs
    # the network eagerly.
    compile_network: bool | str = False
    # Solver-update kernels: "triton" (fewstep.kernels.solver_update), "cuda" / "cpp" (the native op of
    # fewstep.kernels.native, CUDA / CPU tensors), "torch" (the PyTorch references) or "auto": on CPU "cpp"
    # when the native extension is loaded, else "torch"; on CUDA the faster of "triton" and "cuda" timed on
    # the plan's own stages when it is built ("triton" without the native op).  A plan records the backend it
    # resolved; a plan file loaded where that backend cannot run (not built, or another device type)
    # re-resolves "auto", with a warning.
    kernels: str = "auto"
    # Keep the noise every stochastic stage drew, for Plan.recorded_noise() (tests; one more write a stage).
    record_noise: bool = False
    # Launch of the solver-update kernel (block, num_warps).  None: picked from the element count when the
    # plan is built.  A plan records the one it used; a saved plan brings it back and the kernel gets it.
    kernel_config: KernelConfig | None = None

    def __post_init__(self):
        if self.dtype is not None:
            check_float_dtype(self.dtype, "PlanConfig.dtype")
        for name in ("cuda_graph", "check_finite", "record_noise"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PlanConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not any(self.compile_network is m or (isinstance(m, str) and self.compile_network == m)
                   for m in COMPILE_MODES):
            raise ValueError(f"PlanConfig.compile_network must be one of {COMPILE_MODES} (a torch.compile "
                             f"mode without its own CUDA graphs: the plan captures one graph around "
                             f"everything), got {self.compile_network!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"PlanConfig.kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.kernel_config is not None and not isinstance(self.kernel_config, KernelConfig):
            raise ValueError(f"PlanConfig.kernel_config must be a KernelConfig(block, num_warps) or None, "
                             f"got {type(self.kernel_config).__name__}")

    def to_json(self) -> dict:
        """JSON data for a plan file (:meth:`from_json` reads it back)."""
        kc = self.kernel_config
        return {"dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
                "cuda_graph": self.cuda_graph, "check_finite": self.check_finite,
                "compile_network": self.compile_network, "kernels": self.kernels,
                "record_noise": self.record_noise,
                "kernel_config": None if kc is None else {"block": kc.block, "num_warps": kc.num_warps}}

    @classmethod
    def from_json(cls, d: Any, where: str = "config") -> "PlanConfig":
        """The config :meth:`to_json` wrote; a ValueError names a wrong field (``config.kernels``)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing, unknown = [k for k in names if k not in d], sorted(set(d) - set(names))
        if missing:
            raise ValueError(f"{where}.{missing[0]}: field missing")
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        kw = dict(d)
        if kw["dtype"] is not None:
            if kw["dtype"] not in DTYPES or not DTYPES[kw["dtype"]].is_floating_point:
                raise ValueError(f"{where}.dtype: expected a floating-point dtype name, got {kw['dtype']!r}")
            kw["dtype"] = DTYPES[kw["dtype"]]
        kc = kw["kernel_config"]
        if kc is not None:
            w = f"{where}.kernel_config"
            if not isinstance(kc, dict) or sorted(kc) != ["block", "num_warps"] or not all(
                    type(v) is int for v in kc.values()):
                raise ValueError(f"{w}: expected {{'block': int, 'num_warps': int}}, got {kc!r}")
            try:
                kw["kernel_config"] = KernelConfig(kc["block"], kc["num_warps"])
            except ValueError as e:
                raise ValueError(f"{w}: {e}") from None
        try:
            config = cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        # not a field: dataclasses.replace (a plan's own config) drops it
        object.__setattr__(config, "_from_plan_file", True)
        return config


def from_plan_file(config: PlanConfig) -> bool:
    """Whether ``config`` was read from a plan file (:meth:`PlanConfig.from_json`): its ``kernels`` is the
    backend the saved plan resolved, which a plan built from it re-resolves as "auto" (with a warning) when
    that backend cannot run there."""
    return getattr(config, "_from_plan_file", False)


PLAN_OPTIONS = tuple(f.name for f in dataclasses.fields(PlanConfig))


def plan_config(config: PlanConfig | None, options: Mapping[str, Any]) -> PlanConfig:
    """``config``, or a PlanConfig built from keyword ``options`` (one or the other, not both)."""
    if config is not None and not isinstance(config, PlanConfig):
        raise TypeError(f"config must be a fewstep.PlanConfig, got {type(config).__name__}")
    if config is not None and options:
        raise ValueError(f"pass plan options either as config=PlanConfig(...) or as keywords, not both (got "
                         f"config= and {sorted(options)})")
    return config if config is not None else PlanConfig(**options)
