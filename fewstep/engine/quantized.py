"""``fs.compile(..., quant=...)``: quantize the network; calibrate static scales on the plan's timesteps."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..quant import Calibrator, QuantConfig, quantize
from ..quant.int4_calibrate import InputStats
from ..quant.quantize_model import INT4_MODES, find_network
from ..solvers import StepProgram
from ._checks import as_device, as_dtype
from .config import PlanConfig
from .plan import Plan

__all__ = ["quantize_for_plan"]


def quantize_for_plan(model, quant: QuantConfig, program: StepProgram, *, shape: tuple[int, ...], device,
                      cond: Mapping[str, torch.Tensor] | None, config: PlanConfig) -> QuantConfig | None:
    """Quantize ``model`` in place for a plan of ``program`` (``shape`` noise on ``device``, conditioning
    ``cond``, run as ``config`` says); returns ``quant`` (None if there was nothing to quantize).

    A network is quantized and calibrated once: a second plan on the same model (another shape, solver or
    nfe; every plan of an ``fs.Engine``) reuses its FP8 layers and static scales, and asking for another
    structure or calibration is a ValueError.  One network holds one set of scales: calibrating again would
    change them under the plans already built (and under a CUDA graph, replace tensors it reads).
    """
    net = find_network(model)
    report = getattr(net, "_fewstep_quant", None)
    if report is None:
        stats = None
        if quant.mode in INT4_MODES and quant.int4_method == "awq":
            stats = _input_stats(model, net, quant, program, shape, device, cond, config)
        report = quantize(model, quant.mode, **quant.structure, act_stats=stats)
    elif report.mode != quant.mode or report.options != quant.structure:
        raise ValueError(f"the model is already quantized (quant={report.mode!r}, {report.options}); pass a "
                         f"fresh model to compile with quant={quant.mode!r} and {quant.structure}")
    if not report.quantized:
        return None
    if quant.activation_scales == "static":
        done = getattr(net, "_fewstep_calibration", None)
        if done is None:
            _calibrate(model, net, quant, program, shape, device, cond, config)
            net._fewstep_calibration = quant
        elif done != quant:
            raise ValueError(f"the model's static scales were calibrated with {done}; pass a fresh model to "
                             f"calibrate with {quant}")
    return quant


def _eager_plan(model, quant: QuantConfig, program, shape, device, cond, config: PlanConfig):
    """``(plan factory, calibration inputs)``: eager plans (no graph, no torch.compile) of ``program``."""
    inputs = quant.calibration_inputs
    if isinstance(inputs, int):
        g = torch.Generator().manual_seed(quant.seed)
        inputs = [torch.randn(shape, generator=g) for _ in range(inputs)]
    bad = [tuple(x.shape) for x in inputs if tuple(x.shape) != tuple(shape)]
    if bad:
        raise ValueError(f"calibration_inputs: expected noise of the plan's shape {tuple(shape)}, got "
                         f"{bad[0]}")
    device = as_device(device, model)  # the wrapped callable a caller passes hides the model
    eager = dataclasses.replace(config, dtype=as_dtype(config.dtype, model), cuda_graph=False,
                                compile_network=False, record_noise=False)
    return (lambda fn: Plan(fn, program, shape=shape, device=device, cond=cond, config=eager)), inputs


def _input_stats(model, net, quant: QuantConfig, program, shape, device, cond, config: PlanConfig) -> dict:
    """INT4 (AWQ): the unquantized network's layer inputs over the plan's own timesteps."""
    make, inputs = _eager_plan(model, quant, program, shape, device, cond, config)
    plan = make(model)  # the build's warm-up runs before the statistics are recorded
    with InputStats(net, seed=quant.seed) as stats:
        for i, x in enumerate(inputs):
            plan(x.to(plan.device), seed=quant.seed + i, **plan._cond)
    return stats.result()


def _calibrate(model, net, quant: QuantConfig, program, shape, device, cond, config: PlanConfig) -> None:
    """Static scales over the plan's own timesteps: an eager plan (no graph, no torch.compile) of the same
    program runs the calibration inputs while a Calibrator watches every FP8 layer."""
    make, inputs = _eager_plan(model, quant, program, shape, device, cond, config)
    with Calibrator(net, program.nfe, method=quant.method, percentile=quant.percentile) as cal:
        plan = make(cal.wrap(model))
        cal.reset()  # the build's warm-up ran on zeros
        for i, x in enumerate(inputs):
            plan(x.to(plan.device), seed=quant.seed + i, **plan._cond)
    cal.finish(quant.combine)
