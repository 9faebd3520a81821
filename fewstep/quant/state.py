"""Save and restore a quantized network's FP8 state (weights, scales, launch configs) without calibrating.

The state is data: per FP8 layer a JSON entry (which buffers it has, its resolved GEMM launch configs) and
tensors named ``"<layer>/<buffer>"`` (``weight`` E4M3, ``weight_scale`` fp32, ``bias``, ``act_scale`` when
static).  Plan files store the JSON in their document and the tensors beside it (safetensors).

INT4 layers' entries also say ``"format": "int4"``; their tensors are ``packed`` (uint8, two codes a byte),
``scales``, and when present ``zeros``, ``bias`` and ``input_scale`` (AWQ): a plan loads its calibrated INT4
weights without running the calibration again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ..kernels.fp8_gemm import Fp8GemmConfig
from .config import QuantConfig
from .int4_linear import INT4Linear
from .quantize_model import find_network, quantize, quantized_layers

__all__ = ["export_state", "check_state", "restore_state"]

_BUFFERS = ("weight", "weight_scale", "bias", "act_scale")
_INT4_BUFFERS = ("packed", "scales", "zeros", "bias", "input_scale")
_CONFIG_FIELDS = {f.name: f.type for f in dataclasses.fields(Fp8GemmConfig)}


def export_state(model) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """``(layers, tensors)`` of a network quantized with :func:`fewstep.quant.quantize`: per FP8 layer
    ``{"buffers": [...], "configs": {M: Fp8GemmConfig fields}}``, and its buffers on the CPU."""
    net = find_network(model)
    if getattr(net, "_fewstep_quant", None) is None:
        raise ValueError("the model was not quantized with fewstep.quantize")
    layers, tensors = {}, {}
    for name, m in quantized_layers(net).items():
        bufs = m.state_dict()
        layers[name] = {
            "buffers": sorted(bufs),
            "configs": {str(int(mm)): c.to_dict() for mm, c in sorted(m.configs.items())},
        }
        if isinstance(m, INT4Linear):
            layers[name]["format"] = "int4"
        for k, v in bufs.items():
            tensors[f"{name}/{k}"] = v.detach().cpu().contiguous().clone()
    return layers, tensors


def check_state(layers: Any, tensors: Mapping[str, torch.Tensor], where: str = "quant.layers") -> None:
    """Validate what :func:`export_state` wrote (ValueError naming the field) before any model is touched."""
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{where}: expected an object with one entry per FP8 layer")
    for name, entry in layers.items():
        w = f"{where}[{name!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{w}: expected an object, got {type(entry).__name__}")
        for key in ("buffers", "configs"):
            if key not in entry:
                raise ValueError(f"{w}.{key}: field missing")
        bufs = entry["buffers"]
        fmt = entry.get("format", "fp8")
        if fmt not in ("fp8", "int4"):
            raise ValueError(f"{w}.format: expected 'int4' or none (FP8), got {fmt!r}")
        if fmt == "int4":
            if not isinstance(bufs, list) or not {"packed", "scales"} <= set(bufs) <= set(_INT4_BUFFERS):
                raise ValueError(f"{w}.buffers: expected packed, scales and optionally {_INT4_BUFFERS[2:]}; "
                                 f"got {bufs!r}")
        elif not isinstance(bufs, list) or not {"weight", "weight_scale"} <= set(bufs) <= set(_BUFFERS):
            raise ValueError(
                f"{w}.buffers: expected weight, weight_scale and optionally bias, act_scale; got {bufs!r}"
            )
        for b in bufs:
            if f"{name}/{b}" not in tensors:
                raise ValueError(f"tensor {name}/{b} missing")
        configs = entry["configs"]
        if not isinstance(configs, dict):
            raise ValueError(f"{w}.configs: expected an object, got {type(configs).__name__}")
        for m, c in configs.items():
            _gemm_config(m, c, f"{w}.configs[{m!r}]")


def restore_state(model, config: QuantConfig, layers: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Quantize ``model`` (unquantized, the same architecture) as ``config`` says, in place, and load the
    recorded FP8 weights, scales and launch configs: no calibration and no tuning."""
    check_state(layers, tensors)
    quantize(model, config.mode, **config.structure)
    have = quantized_layers(find_network(model))
    if set(have) != set(layers):
        diff = sorted(set(have) ^ set(layers))
        raise ValueError(
            f"the model's FP8 layers differ from the saved ones ({len(diff)} names, e.g. "
            f"{diff[:3]}): is it the same architecture?"
        )
    new = {}
    for name, m in have.items():  # check every layer before changing any
        if isinstance(m, INT4Linear) != (layers[name].get("format") == "int4"):
            raise ValueError(f"{name}: the saved layer and the model's are not the same format (FP8 / INT4)")
        if isinstance(m, INT4Linear):
            new[name] = _int4_buffers(name, m, layers[name]["buffers"], tensors)
            continue
        want = {
            "weight": (tuple(m.weight.shape), torch.float8_e4m3fn),
            "weight_scale": ((m.out_features,), torch.float32),
            "act_scale": ((1,), torch.float32),
        }
        if m.bias is not None:
            want["bias"] = ((m.out_features,), m.bias.dtype)
        bufs = set(layers[name]["buffers"])
        if ("bias" in bufs) != (m.bias is not None):
            raise ValueError(
                f"{name}: the saved layer {'has' if 'bias' in bufs else 'has no'} bias, the model's "
                f"{'has' if m.bias is not None else 'has no'}: is it the same architecture?"
            )
        for b in bufs:
            t = tensors[f"{name}/{b}"]
            shape, dtype = want[b]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{name}/{b}: saved {tuple(t.shape)} {t.dtype} does not fit the model's {shape} {dtype}"
                )
        if "act_scale" in bufs and not bool(
            (tensors[f"{name}/act_scale"] > 0).all() and torch.isfinite(tensors[f"{name}/act_scale"]).all()
        ):
            raise ValueError(f"{name}/act_scale: expected a positive finite scale")
        new[name] = {b: tensors[f"{name}/{b}"].to(m.weight.device) for b in bufs}
    for name, m in have.items():
        if isinstance(m, INT4Linear):
            for b in _INT4_BUFFERS:
                setattr(m, b, new[name].get(b))
            m.configs = {int(mm): _gemm_config(mm, c, name) for mm, c in layers[name]["configs"].items()}
            continue
        with torch.no_grad():
            for b in ("weight", "weight_scale", "bias"):
                if b in new[name]:
                    setattr(m, b, new[name][b])
            m.act_scale = new[name].get("act_scale")
        m.configs = {int(mm): _gemm_config(mm, c, name) for mm, c in layers[name]["configs"].items()}


def _int4_buffers(name: str, m: INT4Linear, bufs: list, tensors) -> dict[str, torch.Tensor]:
    """The saved INT4 buffers of layer ``name``, checked against the model's layer (shapes, dtypes)."""
    n, k = m.out_features, m.in_features
    want = {
        "packed": ((n, k // 2), torch.uint8),
        "scales": (tuple(m.scales.shape), m.scales.dtype),
        "zeros": (tuple(m.scales.shape), torch.uint8),
        "input_scale": ((k,), torch.float32),
    }
    if m.bias is not None:
        want["bias"] = ((n,), m.bias.dtype)
    for b, present in (("bias", m.bias is not None), ("zeros", m.zeros is not None)):
        if (b in bufs) != present:
            raise ValueError(f"{name}: the saved layer {'has' if b in bufs else 'has no'} {b}, the model's "
                             f"{'has' if present else 'has no'}: same architecture and quant config?")
    out = {}
    for b in bufs:
        t = tensors[f"{name}/{b}"]
        shape, dtype = want[b]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name}/{b}: saved {tuple(t.shape)} {t.dtype} does not fit the model's {shape} "
                             f"{dtype}")
        if b == "input_scale" and not bool((t > 0).all() and torch.isfinite(t).all()):
            raise ValueError(f"{name}/input_scale: expected positive finite factors")
        if b == "zeros" and t.numel() and int(t.max()) > 15:
            raise ValueError(f"{name}/zeros: expected 4-bit zero points in [0, 15]")
        out[b] = t.to(m.packed.device)
    return out


def _gemm_config(m: Any, c: Any, where: str) -> Fp8GemmConfig:
    if not isinstance(m, str) or not m.isdigit():
        raise ValueError(f"{where}: expected a GEMM row count M as the key, got {m!r}")
    if not isinstance(c, dict) or sorted(c) != sorted(_CONFIG_FIELDS):
        raise ValueError(f"{where}: expected the fields {sorted(_CONFIG_FIELDS)}, got {c!r}")
    for k, v in c.items():
        if k == "persistent":
            ok = isinstance(v, bool)
        else:  # small positive ints; tile sizes and warps are powers of two
            ok = type(v) is int and 0 < v <= 1024 and (k in ("group_m", "num_stages") or not v & (v - 1))
        if not ok:
            raise ValueError(f"{where}.{k}: invalid value {v!r}")
    return Fp8GemmConfig(**c)
