"""``fs.compile(..., quant=...)``: quantize the network; calibrate static scales on the plan's timesteps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["QUANT_OPTIONS", "quantize_for_plan"]

# quant_options keys: those of fs.quantize, and the calibration's
_STRUCTURE = ("skip", "extra_skip", "fuse_qkv", "fuse_blocks", "tune")
QUANT_OPTIONS = _STRUCTURE + (
    "activation_scales",
    "calibration_inputs",
    "method",
    "percentile",
    "combine",
    "seed",
)


def quantize_for_plan(
    model, quant: str, program, plan_kwargs: Mapping[str, Any], options: Mapping[str, Any] | None
) -> dict | None:
    """Quantize ``model`` in place for a plan of ``program``; returns the ``quantize`` options (None if there
    was nothing to quantize).

    options: ``fs.quantize``'s keywords (skip, extra_skip, fuse_qkv, fuse_blocks, tune) and activation_scales
    ("dynamic", default; or "static": calibrated here), calibration_inputs (noise tensors of the plan's shape,
    or a count of seeded random ones; default 4), method ("absmax" | "percentile"), percentile, combine ("max"
    | "mean" over the plan's timesteps), seed.
    """
    from ..quant import Calibrator, check_mode, quantize
    from ..quant.quantize_model import find_network
    from .plan import Plan, _as_device, _as_dtype

    check_mode(quant)
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(QUANT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown quant_options {unknown}; known: {list(QUANT_OPTIONS)}")
    scales = opts.pop("activation_scales", "dynamic")
    if scales not in ("dynamic", "static"):
        raise ValueError(f"activation_scales must be 'dynamic' or 'static', got {scales!r}")
    structure = {k: opts.pop(k) for k in _STRUCTURE if k in opts}
    inputs = opts.pop("calibration_inputs", 4)
    method, percentile = opts.pop("method", "absmax"), opts.pop("percentile", 99.99)
    combine, seed = opts.pop("combine", "max"), opts.pop("seed", 0)
    net = find_network(model)
    report = getattr(net, "_fewstep_quant", None)
    if report is None:
        report = quantize(model, quant, **structure)
    elif report.mode != quant or (structure and structure != {k: report.options[k] for k in structure}):
        raise ValueError(
            f"the model is already quantized (quant={report.mode!r}, {report.options}); pass a "
            f"fresh model to compile with quant={quant!r} and {structure}"
        )
    if not report.quantized:
        return None
    if scales == "static":
        shape = tuple(plan_kwargs["shape"])
        if isinstance(inputs, int):
            if inputs < 1:
                raise ValueError(f"calibration_inputs must be >= 1, got {inputs}")
            g = torch.Generator().manual_seed(int(seed))
            inputs = [torch.randn(shape, generator=g) for _ in range(inputs)]
        device = _as_device(plan_kwargs.get("device"), model)  # the wrapped callable below hides the model
        kw = {
            **plan_kwargs,
            "cuda_graph": False,
            "record_noise": False,
            "device": device,
            "dtype": _as_dtype(plan_kwargs.get("dtype"), model),
        }
        with Calibrator(net, program.nfe, method=method, percentile=percentile) as cal:
            plan = Plan(cal.wrap(model), program, **kw)
            cal.reset()  # the build's warm-up ran on zeros
            cond = {k: v for k, v in plan._cond.items()}
            for i, x in enumerate(inputs):
                plan(x.to(plan.device), seed=int(seed) + i, **cond)
        cal.finish(combine)
    return dict(report.options)
