"""Static activation scales, calibrated over a plan's own timesteps.

A :class:`Calibrator` hooks every :class:`FP8Linear` of a quantized network and records, per layer and per
network call index (= per timestep of the plan: a plan calls the network ``nfe`` times per sample, in order),
the absmax (or a percentile of ``|x|``) of the layer's input, maximized over the calibration inputs.
``finish``
combines the per-timestep values of a layer ("max": safe against clipping, "mean": tighter) into one static
per-tensor scale ``value / 448`` and installs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..kernels.quantize_fp8 import E4M3_MAX
from .dit_block import FP8DiTBlock
from .fp8_linear import FP8Linear

__all__ = ["Calibrator", "CALIBRATION_METHODS", "COMBINE"]

CALIBRATION_METHODS = ("absmax", "percentile")
COMBINE = ("max", "mean")
_MAX_SAMPLE = 1 << 22  # |x| values a percentile is computed from (a strided subsample of larger inputs)


class Calibrator:
    """Record per-layer, per-timestep input ranges of ``net``'s FP8 layers while ``wrap(fn)`` runs.

    method: "absmax" or "percentile" (``percentile`` of ``|x|``, in (0, 100]).  nfe: network calls per sample.
    Use as a context manager (observers are removed on exit) and call :meth:`finish` to install the scales.
    """

    def __init__(self, net: nn.Module, nfe: int, *, method: str = "absmax", percentile: float = 99.99):
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        self.net, self.nfe, self.method, self.percentile = net, nfe, method, percentile
        self.layers = {n: m for n, m in net.named_modules() if isinstance(m, FP8Linear)}
        self.blocks = [m for m in net.modules() if isinstance(m, FP8DiTBlock)]
        self.stats: dict[str, list[float]] = {}
        self.calls = 0

    def __enter__(self) -> "Calibrator":
        # Layers observe with dynamic scales; a static scale tensor they already had is kept aside and gets
        # the new value in place (finish), or is put back untouched (an error before finish): plans and CUDA
        # graphs captured earlier read that tensor, so it must never be replaced or freed.
        self._kept = {name: m.act_scale for name, m in self.layers.items()}
        for name, m in self.layers.items():
            m.set_act_scale(None)
            m.observer = self._observer(name)
        for b in self.blocks:
            b.calibrating = True
        return self

    def __exit__(self, *exc) -> None:
        for name, m in self.layers.items():
            m.observer = None
            if m.act_scale is None and self._kept.get(name) is not None:
                m.act_scale = self._kept[name]  # finish() did not run: the old static scale, unchanged
        for b in self.blocks:
            b.calibrating = False

    def reset(self) -> None:
        self.stats.clear()
        self.calls = 0

    def wrap(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``fn`` that counts its calls (call ``i`` is timestep ``i % nfe`` of the plan)."""

        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls += 1
            return out

        counted.__wrapped__ = fn
        return counted

    def _observer(self, name: str):
        def observe(module, x2d):
            v = self._range(x2d.detach())
            step = self.calls % self.nfe
            row = self.stats.setdefault(name, [0.0] * self.nfe)
            row[step] = max(row[step], v)

        return observe

    def _range(self, x: torch.Tensor) -> float:
        a = x.abs().float().reshape(-1)
        if self.method == "absmax" or self.percentile == 100:
            return float(a.max())
        if a.numel() > _MAX_SAMPLE:
            a = a[:: math.ceil(a.numel() / _MAX_SAMPLE)]
        k = max(1, math.ceil(self.percentile / 100 * a.numel()))
        return float(a.kthvalue(k).values)

    def finish(self, combine: str = "max") -> dict[str, list[float]]:
        """Install static scales (combined over timesteps); returns the per-layer, per-timestep ranges."""
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        missing = sorted(set(self.layers) - set(self.stats))
        if missing:
            raise RuntimeError(
                f"calibration saw no input for {len(missing)} FP8 layers (e.g. {missing[:3]}); "
                f"run the network through wrap(fn) before finish()"
            )
        for name, m in self.layers.items():
            row = self.stats[name]
            seen = [v for v in row if v > 0] or [1e-12]
            value = max(seen) if combine == "max" else sum(seen) / len(seen)
            if not math.isfinite(value):
                raise FloatingPointError(f"calibration of {name}: input range {value} is not finite")
            kept = getattr(self, "_kept", {}).get(name)
            if m.act_scale is None and kept is not None:
                m.act_scale = kept  # set_act_scale below copies into it: its address never changes
            m.set_act_scale(max(value, 1e-12) / E4M3_MAX)
        return {k: list(v) for k, v in self.stats.items()}
