"""Save and restore a quantized network's FP8 state (weights, scales, launch configs) without calibrating."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.fp8_gemm import Fp8GemmConfig
from .quantize_model import find_network, quantize, quantized_layers

__all__ = ["export_state", "restore_state"]

_FORMAT = "fewstep.quant/1"


def export_state(model, structure: dict[str, Any]) -> dict:
    """Everything :func:`restore_state` needs: the mode and ``quantize`` options (``structure``), and per FP8
    layer its quantized weight, scales, bias, static activation scale and resolved launch configs
    (on the CPU)."""
    net = find_network(model)
    report = getattr(net, "_fewstep_quant", None)
    if report is None:
        raise ValueError("the model was not quantized with fewstep.quantize")
    layers = {}
    for name, m in quantized_layers(net).items():
        layers[name] = {
            "buffers": {k: v.detach().cpu() for k, v in m.state_dict().items()},
            "configs": {int(mm): c.to_dict() for mm, c in m.configs.items()},
        }
    return {"format": _FORMAT, "mode": report.mode, "structure": dict(structure), "layers": layers}


def restore_state(model, state: dict) -> None:
    """Quantize ``model`` (unquantized, the same architecture) as recorded in ``state``, in place, and load
    the recorded FP8 weights, scales and configs: no calibration and no tuning."""
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"not a fewstep quantization state (format {_FORMAT})")
    quantize(model, state["mode"], **state["structure"])
    layers = quantized_layers(find_network(model))
    if set(layers) != set(state["layers"]):
        diff = sorted(set(layers) ^ set(state["layers"]))
        raise ValueError(
            f"the model's FP8 layers differ from the saved ones ({len(diff)} names, e.g. {diff[:3]}): "
            f"is it the same architecture?"
        )
    for name, m in layers.items():
        saved = state["layers"][name]
        bufs = saved["buffers"]
        if tuple(bufs["weight"].shape) != tuple(m.weight.shape):
            raise ValueError(
                f"{name}: saved weight {tuple(bufs['weight'].shape)} does not fit {tuple(m.weight.shape)}"
            )
        dev = m.weight.device
        with torch.no_grad():
            m.weight = bufs["weight"].to(dev)
            m.weight_scale = bufs["weight_scale"].to(dev)
            if m.bias is not None:
                m.bias = bufs["bias"].to(dev)
            m.act_scale = bufs["act_scale"].to(dev) if bufs.get("act_scale") is not None else None
        m.configs = {int(mm): Fp8GemmConfig(**c) for mm, c in saved["configs"].items()}
