"""``fs.compile`` (model + sampler -> Plan) and ``fs.load`` (a plan file + model -> Plan)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..quant.config import QuantConfig, quant_config
from ..solvers import ModelSpec
from ..solvers.tuning import Tuned, program_for
from . import quantized
from ._checks import as_shape
from .config import PLAN_OPTIONS, PlanConfig, plan_config
from .plan import Model, Plan, check_required_cond
from .planfile import PlanFileError, read_plan_file

__all__ = ["compile", "load", "split_options"]


def compile(model: Model, spec: ModelSpec, *, solver: "str | Tuned", nfe: int, shape: Sequence[int],
            device: torch.device | str | None = None, cond: Mapping[str, torch.Tensor] | None = None,
            spacing: Any = None, guidance_scale: float | None = None, config: PlanConfig | None = None,
            quant: str | QuantConfig | None = None, quant_options: Mapping[str, Any] | None = None,
            graph_pool: Any = None, **options: Any) -> Plan:
    """Build solver ``solver`` with ``nfe`` calls for ``model`` and bind it to static buffers of ``shape``.

    solver: a solver name, or a :class:`fewstep.solvers.Tuned` from ``fs.tune`` / ``fs.load_tuned`` (its
    program is used as it is, after checking that spec, nfe and guidance_scale are the ones it was tuned for).

    model: ``model(x, t, **cond) -> raw output`` with ``t`` a ``(x.shape[0],)`` float32 tensor on the device;
    with guidance ``x`` has batch ``2 * shape[0]`` and the model builds ``[uncond; cond]`` from ``cond`` (as
    the adapters in ``fs.models`` do).  shape: the noise shape ``(batch, ...)``, positive ints.  cond: example
    conditioning tensors (shapes and dtypes of every call; values used for warm-up); a model that declares
    ``required_cond`` (the adapters do) must get those keys.
    config: a :class:`PlanConfig` (dtype, cuda_graph, check_finite, compile_network, kernels, record_noise,
    kernel_config), or its fields as keywords (``dtype=torch.bfloat16``), not both.
    quant: None, "fp8", "fp8-emulated" (with ``quant_options``: the other :class:`fewstep.quant.QuantConfig`
    fields) or a QuantConfig: the model's linear layers are swapped in place before capture.
    graph_pool: a CUDA graph memory pool shared with other plans (``fs.Engine`` passes one).
    options: the solver's options (``fs.solvers.get(solver).options``).
    """
    options, plan_kw = split_options(options)
    config = plan_config(config, plan_kw)
    quant = quant_config(quant, quant_options)
    shape = as_shape(shape)
    prog = program_for(solver, spec, nfe, spacing, guidance_scale=guidance_scale, **options)
    check_required_cond(model, cond)  # before quantizing the model in place
    if quant is not None:
        quant = quantized.quantize_for_plan(model, quant, prog, shape=shape, device=device, cond=cond,
                                            config=config)
    return Plan(model, prog, shape=shape, device=device, cond=cond, config=config, graph_pool=graph_pool,
                quant=quant)


def load(path, model: Model, *, device: torch.device | str | None = None, graph_pool: Any = None) -> Plan:
    """Rebuild a plan written by :meth:`Plan.save` around ``model``: no solver build, the recorded config and
    kernel launch.  A quantized plan quantizes ``model`` (unquantized, the same architecture) in place with
    the saved FP8 weights, scales and launch configs: no calibration and no tuning.

    The file is parsed as data and validated (it is never unpickled); any problem with it is a
    :class:`~fewstep.engine.planfile.PlanFileError` (a ValueError) naming the file and what is wrong, and so
    is FP8 state that does not fit ``model`` (found after ``model`` was quantized in place).
    """
    f = read_plan_file(path)
    if f.quant is not None:
        from ..quant import restore_state

        try:
            restore_state(model, f.quant, f.quant_layers, f.tensors)
        except ValueError as e:
            raise PlanFileError(path, f"its FP8 state does not fit this model: {e}") from e
    cond = {k: torch.zeros(s, dtype=d) for k, (s, d) in f.cond.items()}
    return Plan(model, f.program, shape=f.shape, device=device, cond=cond, config=f.config,
                graph_pool=graph_pool, quant=f.quant)


def split_options(options: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(solver options, PlanConfig fields)`` of a keyword dict."""
    plan_kw = {k: v for k, v in options.items() if k in PLAN_OPTIONS}
    return {k: v for k, v in options.items() if k not in PLAN_OPTIONS}, plan_kw
