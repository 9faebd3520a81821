"""``QuantConfig``: how ``fs.compile(..., quant=...)`` quantizes a network, one frozen object.

``quant="fp8"`` with ``quant_options={...}`` is the keyword form of ``QuantConfig("fp8", ...)``.  The
structure fields (skip rules, fusions, tuning) are :func:`fewstep.quant.quantize`'s keywords; the calibration
fields say how static activation scales are measured over a plan's own timesteps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .calibrate import CALIBRATION_METHODS, COMBINE
from .int4_calibrate import INT4_METHODS
from .quantize_model import INT4_MODES, QUANT_MODES, SkipRule

__all__ = ["QuantConfig", "QUANT_OPTIONS", "quant_config"]

ACTIVATION_SCALES = ("dynamic", "static")
STRUCTURE = ("skip", "extra_skip", "fuse_qkv", "fuse_blocks", "tune")
INT4_STRUCTURE = ("group_size", "zero_point")  # quantize()'s keywords for INT4 modes only
CALIBRATION = ("activation_scales", "calibration_inputs", "method", "percentile", "combine", "seed",
               "int4_method")
# fields added after plan files were first written: a file without them reads as these defaults
_LATER_FIELDS = {"group_size": 128, "zero_point": False, "int4_method": "awq"}
QUANT_OPTIONS = STRUCTURE + INT4_STRUCTURE + CALIBRATION  # the keys of quant_options= (every field but mode)


@dataclass(frozen=True)
class QuantConfig:
    """How a plan's network is quantized.  Invalid values raise ValueError naming the field."""

    # "fp8": E4M3 weights and activations on FP8 tensor cores (CUDA sm_89+; CPU under TRITON_INTERPRET=1);
    # "fp8-emulated": the same numbers computed with PyTorch ops, on any device.
    # "int4": group-wise INT4 weights, 16-bit activations (W4A16 Triton GEMM, CUDA sm_80+); "w4a8": INT4
    # weights with per-token FP8 activations (FP8 tensor cores, sm_89+); "int4-emulated" / "w4a8-emulated":
    # the same numbers with PyTorch ops, on any device.
    mode: str = "fp8"
    # Activation scales: "dynamic" (per token, computed in the quantize kernel at every call) or "static" (one
    # per layer, calibrated over the plan's own timesteps when the plan is built).
    activation_scales: str = "dynamic"
    # Static calibration inputs: noise tensors of the plan's shape, or how many seeded random ones to draw.
    # Not compared by ==.
    calibration_inputs: int | tuple[torch.Tensor, ...] = field(default=4, compare=False)
    # Calibration statistic of each layer's input: "absmax" or "percentile" (of |x|).
    method: str = "absmax"
    # The percentile of |x| for method="percentile", in (0, 100].
    percentile: float = 99.99
    # How a layer's per-timestep ranges become one scale: "max" (never clips a calibration input) or "mean".
    combine: str = "max"
    # Seed of the random calibration inputs and of the calibration runs' stochastic noise.
    seed: int = 0
    # Skip rules (layers that stay unquantized); None: fewstep.quant.DEFAULT_SKIP.
    skip: tuple[SkipRule, ...] | None = None
    # More skip rules on top of ``skip``: SkipRules or fnmatch patterns.
    extra_skip: tuple[SkipRule | str, ...] = ()
    # Fuse self-attention q/k/v (cross-attention k/v) projections into one GEMM.
    fuse_qkv: bool = True
    # Fuse a DiT block's LayerNorm + adaLN modulation + quantization into one kernel (FP8DiTBlock).
    fuse_blocks: bool = True
    # Time the FP8 GEMM launch configs on the GPU when the plan is built, instead of the size heuristic.
    tune: bool = False
    # INT4 modes: input channels per weight scale (64 or 128; 32 and 256 allowed).
    group_size: int = 128
    # INT4 modes: asymmetric groups (a 4-bit zero point per group) instead of symmetric ones.
    zero_point: bool = False
    # INT4 modes: "awq" (activation-aware scale and clip search on inputs recorded over the plan's own
    # timesteps, from ``calibration_inputs``) or "rtn" (round to nearest, no calibration run).
    int4_method: str = "awq"

    def __post_init__(self):
        if self.mode not in QUANT_MODES:
            raise ValueError(
                f"unknown quant mode {self.mode!r}; known modes: "
                f"{', '.join(map(repr, QUANT_MODES))} (or None)"
            )
        _one_of("activation_scales", self.activation_scales, ACTIVATION_SCALES)
        _one_of("method", self.method, CALIBRATION_METHODS)
        _one_of("combine", self.combine, COMBINE)
        _one_of("int4_method", self.int4_method, INT4_METHODS)
        _one_of("group_size", self.group_size, (32, 64, 128, 256))
        if not isinstance(self.zero_point, bool):
            raise ValueError(f"QuantConfig.zero_point must be True or False, got {self.zero_point!r}")
        if self.mode in INT4_MODES and self.activation_scales != "dynamic":
            raise ValueError(
                f"QuantConfig.activation_scales={self.activation_scales!r} is for FP8 activations; quant="
                f"{self.mode!r} quantizes activations per token (w4a8) or not at all (int4): use 'dynamic'"
            )
        inputs = self.calibration_inputs
        if isinstance(inputs, list):
            object.__setattr__(self, "calibration_inputs", inputs := tuple(inputs))
        if isinstance(inputs, tuple):
            if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
                raise ValueError(
                    "QuantConfig.calibration_inputs: expected a count >= 1 or a non-empty list of "
                    "noise tensors"
                )
        elif isinstance(inputs, bool) or not isinstance(inputs, int) or inputs < 1:
            raise ValueError(
                f"QuantConfig.calibration_inputs must be >= 1 (a count) or a list of noise "
                f"tensors, got {inputs!r}"
            )
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 100 and math.isfinite(p)):
            raise ValueError(f"QuantConfig.percentile must be in (0, 100], got {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"QuantConfig.seed must be an int >= 0, got {self.seed!r}")
        if self.skip is not None:
            object.__setattr__(self, "skip", tuple(self.skip))
            if not all(isinstance(r, SkipRule) for r in self.skip):
                raise ValueError(
                    "QuantConfig.skip must be SkipRules (or None for DEFAULT_SKIP); plain patterns go "
                    "in extra_skip"
                )
        if isinstance(self.extra_skip, str):
            raise ValueError(
                f"QuantConfig.extra_skip must be a list of patterns, got the str {self.extra_skip!r}"
            )
        object.__setattr__(self, "extra_skip", tuple(self.extra_skip))
        if not all(isinstance(r, (SkipRule, str)) for r in self.extra_skip):
            raise ValueError("QuantConfig.extra_skip must hold SkipRules or fnmatch patterns (str)")
        for name in ("fuse_qkv", "fuse_blocks", "tune"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantConfig.{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def structure(self) -> dict[str, Any]:
        """:func:`fewstep.quant.quantize`'s keywords."""
        keys = STRUCTURE + (INT4_STRUCTURE if self.mode in INT4_MODES else ())
        return {k: getattr(self, k) for k in keys}

    def to_json(self) -> dict:
        """JSON data for a plan file (tensor calibration inputs are recorded by count)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(d["calibration_inputs"], tuple):
            d["calibration_inputs"] = len(d["calibration_inputs"])
        d["skip"] = None if self.skip is None else [_rule_json(r) for r in self.skip]
        d["extra_skip"] = [_rule_json(r) for r in self.extra_skip]
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "quant.config") -> "QuantConfig":
        """The config :meth:`to_json` wrote; ValueError naming the field if it is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        d = {**{k: v for k, v in _LATER_FIELDS.items() if k not in d}, **d}
        missing, unknown = [k for k in names if k not in d], sorted(set(d) - set(names))
        if missing:
            raise ValueError(f"{where}.{missing[0]}: field missing")
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        kw = dict(d)
        for key in ("skip", "extra_skip"):
            rules = kw[key]
            if rules is None and key == "skip":
                continue
            if not isinstance(rules, list):
                raise ValueError(f"{where}.{key}: expected a list, got {type(rules).__name__}")
            kw[key] = tuple(_rule_from_json(r, f"{where}.{key}[{i}]") for i, r in enumerate(rules))
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def quant_config(quant: str | QuantConfig | None, options: Mapping[str, Any] | None) -> QuantConfig | None:
    """``quant=`` and ``quant_options=`` of ``fs.compile`` / ``fs.Engine`` as one QuantConfig (or None)."""
    if isinstance(quant, QuantConfig):
        if options:
            raise ValueError(
                "quant_options given with quant=QuantConfig(...); put the options in the QuantConfig"
            )
        return quant
    if quant is None:
        if options:
            raise ValueError("quant_options given without quant=; pass quant='fp8' or 'fp8-emulated'")
        return None
    options = dict(options or {})
    unknown = sorted(set(options) - set(QUANT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown quant_options {unknown}; known: {list(QUANT_OPTIONS)}")
    return QuantConfig(quant, **options)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"QuantConfig.{name} must be one of {allowed}, got {value!r}")


def _rule_json(rule: SkipRule | str) -> dict | str:
    return rule if isinstance(rule, str) else {"pattern": rule.pattern, "reason": rule.reason}


def _rule_from_json(r: Any, where: str) -> SkipRule | str:
    if isinstance(r, str):
        return r
    if (
        isinstance(r, dict)
        and sorted(r) == ["pattern", "reason"]
        and all(isinstance(v, str) for v in r.values())
    ):
        return SkipRule(r["pattern"], r["reason"])
    raise ValueError(f"{where}: expected a pattern or {{'pattern': str, 'reason': str}}, got {r!r}")
