"""FP8 layers in ONNX: ``QuantizeLinear`` / ``DequantizeLinear`` (E4M3) around a float GEMM.

This is the explicit-quantization form TensorRT builds FP8 engines from: weights stored as E4M3 initializers
with their per-output-channel scales in a ``DequantizeLinear`` (axis 0); activations through a
``QuantizeLinear`` -> ``DequantizeLinear`` pair carrying the calibrated per-tensor scale (static scales), or a
per-token scale computed in the graph (dynamic scales: ``ReduceMax(|x|) / 448``, axis 0; TensorRT wants
build-time-constant scales, so calibrate with ``activation_scales="static"`` for it).  The numbers are those
of the ``fp8-emulated`` layers (:func:`fewstep.kernels.quantize_fp8.quantize_fp8_ref`,
:func:`fewstep.kernels.fp8_gemm.fp8_gemm_ref`): the same rounding, with the scales applied before the GEMM
instead of after it.

:func:`qdq_layers` swaps every :class:`~fewstep.quant.FP8Linear` of a network for a :class:`QDQLinear` that
shares its tensors (nothing is copied) for the duration of an export, and runs fused DiT blocks
(:class:`~fewstep.quant.FP8DiTBlock`) on their unfused path (LayerNorm + modulation in float, then the
layer's own quantization), then puts everything back, also after an error.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.quantize_fp8 import E4M3_MAX, MIN_SCALE, round_e4m3_ref

__all__ = ["QDQLinear", "qdq_layers", "MIN_OPSET"]

MIN_OPSET = 19  # QuantizeLinear / DequantizeLinear with float8 types


class _QuantDequant(torch.autograd.Function):
    """``x -> dequant(quant_e4m3(x / scale))``: scale a scalar (per tensor) or ``(rows,)`` (axis 0)."""

    @staticmethod
    def forward(ctx, x, scale, rows: int):
        s = scale.reshape(-1, 1) if rows else scale
        return round_e4m3_ref(x / s).float() * s

    @staticmethod
    def symbolic(g, x, scale, rows: int):
        zero = torch.zeros((rows,) if rows else (), dtype=torch.float8_e4m3fn)
        zp = g.op("Constant", value_t=zero)
        q = g.op("QuantizeLinear", x, scale, zp, axis_i=0, saturate_i=1)
        return g.op("DequantizeLinear", q, scale, zp, axis_i=0)


class _Dequant(torch.autograd.Function):
    """E4M3 weights ``(N, K)`` with per-row scales ``(N,)`` -> float ``(N, K)``."""

    @staticmethod
    def forward(ctx, w, scale):
        return w.float() * scale.reshape(-1, 1)

    @staticmethod
    def symbolic(g, w, scale):
        return g.op("DequantizeLinear", w, scale, axis_i=0)


class QDQLinear(nn.Module):
    """An export view of an ``FP8Linear`` (or ``FP8Conv1x1``): same tensors, Q/DQ + float GEMM in forward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        from ..quant import FP8Conv1x1

        self.conv = isinstance(layer, FP8Conv1x1)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.activation, self.out_dtype = layer.activation, layer.out_dtype
        self.register_buffer("weight", layer.weight)
        self.register_buffer("weight_scale", layer.weight_scale)
        self.register_buffer("bias", layer.bias)
        self.register_buffer("act_scale", layer.act_scale)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        if self.conv:
            b, _, h, w = x.shape
            y = self._linear(x.permute(0, 2, 3, 1), None, None)
            return y.reshape(b, h, w, self.out_features).permute(0, 3, 1, 2)
        return self._linear(x, residual, gate)

    def _linear(self, x, residual, gate):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self.act_scale is not None:
            xq = _QuantDequant.apply(x2, self.act_scale.reshape(()), 0)
        else:  # per-token scales, computed in the graph as quantize_fp8_ref does
            scale = (x2.abs().amax(dim=1) / E4M3_MAX).clamp_min(MIN_SCALE)
            xq = _QuantDequant.apply(x2, scale, int(x2.shape[0]))  # a Python int: the Q/DQ's static axis size
        w = _Dequant.apply(self.weight, self.weight_scale)
        acc = F.linear(xq, w, None if self.bias is None else self.bias.float())
        if self.activation is not None:
            acc = F.gelu(acc, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        if residual is not None:  # the adaLN-Zero residual: residual + gate[batch] * acc
            b = gate.shape[0]
            acc = (residual.float().reshape(b, -1, self.out_features)
                   + gate.float().reshape(b, 1, self.out_features) * acc.reshape(b, -1, self.out_features))
        return acc.to(self.out_dtype).reshape(*lead, self.out_features)


@contextmanager
def qdq_layers(network: nn.Module | None):
    """Within the block, ``network``'s FP8 layers are :class:`QDQLinear` views and its fused DiT blocks run
    unfused; yields the number of layers swapped (0: not quantized).  Restored on exit, errors included."""
    if network is None:
        yield 0
        return
    from ..quant import FP8DiTBlock, FP8Linear

    swaps, blocks = [], []
    try:
        for parent in list(network.modules()):
            if isinstance(parent, FP8DiTBlock):
                blocks.append((parent, parent.calibrating))
                parent.calibrating = True  # the unfused path: each layer quantizes its own input
            for name, child in list(parent.named_children()):
                if isinstance(child, FP8Linear):
                    setattr(parent, name, QDQLinear(child))
                    swaps.append((parent, name, child))
        yield len(swaps)
    finally:
        for parent, name, child in reversed(swaps):
            setattr(parent, name, child)
        for block, was in blocks:
            block.calibrating = was
