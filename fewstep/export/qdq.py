"""FP8 and INT4 layers in ONNX: ``QuantizeLinear`` / ``DequantizeLinear`` around a float GEMM.

This is the explicit-quantization form TensorRT builds FP8 engines from: weights stored as E4M3 initializers
with their per-output-channel scales in a ``DequantizeLinear`` (axis 0); activations through a
``QuantizeLinear`` -> ``DequantizeLinear`` pair carrying the calibrated per-tensor scale (static scales), or a
per-token scale computed in the graph (dynamic scales: ``ReduceMax(|x|) / 448``, axis 0; TensorRT wants
build-time-constant scales, so calibrate with ``activation_scales="static"`` for it).  The numbers are those
of the ``fp8-emulated`` layers (:func:`fewstep.kernels.quantize_fp8.quantize_fp8_ref`,
:func:`fewstep.kernels.fp8_gemm.fp8_gemm_ref`): the same rounding, with the scales applied before the GEMM
instead of after it.

INT4 layers (:class:`~fewstep.quant.INT4Linear`, opset 21) export as ONNX's blocked weight-only form: the
weight transposed to ``(K, N)`` in a 4-bit initializer (INT4 ``q - 8`` for symmetric groups, UINT4 with
UINT4 zero points otherwise), its group scales ``(K // G, N)`` in a ``DequantizeLinear`` with ``axis`` 0 and
``block_size`` G feeding a ``MatMul`` (the layout onnxruntime fuses into MatMulNBits); an AWQ input scale is
a ``Div`` before it.  "w4a8" layers also pass their activations through the per-token E4M3 Q/DQ of the FP8
dynamic path.  The numbers are those of ``int4_gemm_ref`` / ``w4a8_gemm_ref``
(:mod:`fewstep.kernels.int4_gemm`).  The trace emits a placeholder node that :func:`int4_initializers`
rewrites, since the TorchScript exporter knows neither 4-bit types nor opset 21.

:func:`qdq_layers` swaps every :class:`~fewstep.quant.FP8Linear` (:class:`~fewstep.quant.INT4Linear`) of a
network for a :class:`QDQLinear` (:class:`QDQInt4Linear`) reading its tensors for the duration of an export
(FP8 tensors are shared; INT4 codes are unpacked and transposed), and runs fused DiT blocks
(:class:`~fewstep.quant.FP8DiTBlock`) on their unfused path (LayerNorm + modulation in float, then the
layer's own quantization), then puts everything back, also after an error.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.quantize_fp8 import E4M3_MAX, MIN_SCALE, round_e4m3_ref

__all__ = ["QDQLinear", "QDQInt4Linear", "qdq_layers", "int4_initializers", "quant_opset", "MIN_OPSET",
           "INT4_MIN_OPSET"]

MIN_OPSET = 19  # QuantizeLinear / DequantizeLinear with float8 types
INT4_MIN_OPSET = 21  # INT4 / UINT4 types and blocked DequantizeLinear (block_size)
INT4_DOMAIN, INT4_OP = "fewstep", "DequantizeInt4"  # the placeholder node between trace and file


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
            xq = _per_token_qdq(x2)
        w = _Dequant.apply(self.weight, self.weight_scale)
        acc = F.linear(xq, w, None if self.bias is None else self.bias.float())
        return _epilogue(self, acc, residual, gate).reshape(*lead, self.out_features)


def _per_token_qdq(x2: torch.Tensor) -> torch.Tensor:
    """E4M3 Q/DQ of ``x2: (rows, K)`` fp32, per-token scales computed in the graph as quantize_fp8_ref's."""
    scale = (x2.abs().amax(dim=1) / E4M3_MAX).clamp_min(MIN_SCALE)
    return _QuantDequant.apply(x2, scale, int(x2.shape[0]))  # a Python int: the Q/DQ's static axis size


def _epilogue(layer: nn.Module, acc: torch.Tensor, residual, gate) -> torch.Tensor:
    """GELU, the adaLN-Zero gated residual (``residual + gate[batch] * acc``) and the cast to the layer's
    dtype, in fp32 as the GEMMs' epilogues (``acc``: (rows, N) fp32, bias added)."""
    if layer.activation is not None:
        acc = F.gelu(acc, approximate="tanh" if layer.activation == "gelu_tanh" else "none")
    if residual is not None:
        b, n = gate.shape[0], layer.out_features
        acc = residual.float().reshape(b, -1, n) + gate.float().reshape(b, 1, n) * acc.reshape(b, -1, n)
    return acc.to(layer.out_dtype)


class _DequantInt4(torch.autograd.Function):
    """INT4 codes ``(K, N)`` uint8 in [0, 15] (the transposed, unpacked weight), scales ``(K // G, N)`` and
    optional zero points ``(K // G, N)`` uint8 (None: symmetric, zero point 8) -> float ``(K, N)``.  Exported
    as a placeholder node that :func:`int4_initializers` turns into a blocked ``DequantizeLinear`` of an INT4
    / UINT4 initializer: the TorchScript exporter has neither 4-bit tensor types nor opset 21."""

    @staticmethod
    def forward(ctx, codes, scale, zeros, group_size: int):
        z = 8.0 if zeros is None else zeros.float().repeat_interleave(group_size, 0)
        w = (codes.float() - z) * scale.float().repeat_interleave(group_size, 0)
        return w.to(scale.dtype)  # DequantizeLinear's output has the scale's dtype

    @staticmethod
    def symbolic(g, codes, scale, zeros, group_size: int):
        args = (codes, scale) if zeros is None or _is_none(zeros) else (codes, scale, zeros)
        out = g.op(f"{INT4_DOMAIN}::{INT4_OP}", *args, block_size_i=group_size)
        out.setType(codes.type().with_dtype(scale.type().dtype()))  # (K, N), the scale's dtype
        return out


def _is_none(v) -> bool:
    return v.node().mustBeNone() if hasattr(v, "node") else v is None


class QDQInt4Linear(nn.Module):
    """An export view of an ``INT4Linear`` (or ``INT4Conv1x1``): its INT4 weight as a blocked
    ``DequantizeLinear`` feeding a float ``MatMul``; for kind "w4a8" the activation also passes an E4M3
    per-token Q/DQ.  Numbers as ``int4_gemm_ref`` / ``w4a8_gemm_ref``, the scales applied before the GEMM."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        from ..kernels.int4_gemm import unpack_int4_ref
        from ..quant import INT4Conv1x1

        self.conv = isinstance(layer, INT4Conv1x1)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.group_size, self.kind = layer.group_size, layer.kind
        self.activation, self.out_dtype = layer.activation, layer.out_dtype
        # (K, N): the layout MatMul reads (x @ W.T), blocked along K (axis 0); unpacked for the export only,
        # int4_initializers packs them again as 4-bit.  W4A16 keeps the layer's scale dtype, so the DQ output
        # is W rounded to the activations' dtype as int4_gemm_ref rounds it; W4A8 dequantizes in fp32.
        self.register_buffer("codes", unpack_int4_ref(layer.packed).t().contiguous())
        scales = layer.scales if self.kind == "w4a16" else layer.scales.float()
        self.register_buffer("scale", scales.t().contiguous())
        self.register_buffer("zeros", None if layer.zeros is None else layer.zeros.t().contiguous())
        self.register_buffer("bias", layer.bias)
        self.register_buffer("input_scale", layer.input_scale)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        if self.conv:
            b, _, h, w = x.shape
            y = self._linear(x.permute(0, 2, 3, 1), None, None)
            return y.reshape(b, h, w, self.out_features).permute(0, 3, 1, 2)
        return self._linear(x, residual, gate)

    def _linear(self, x, residual, gate):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:  # AWQ: (x / s) @ Q(W * s).T
            x2 = x2 / self.input_scale.to(x2.dtype)
        w = _DequantInt4.apply(self.codes, self.scale, self.zeros, self.group_size)
        if w.dtype != torch.float32:  # a half W4A16 weight, rounded as int4_gemm_ref rounds it, then fp32
            w = w.float()  # (no Cast between the DQ and the MatMul otherwise: the pattern engines fuse)
        if self.kind == "w4a8":
            x2 = _per_token_qdq(x2.float())
        else:
            x2 = x2.to(self.out_dtype).float()
        acc = x2 @ w
        if self.bias is not None:
            acc = acc + self.bias.float()
        return _epilogue(self, acc, residual, gate).reshape(*lead, self.out_features)


def int4_initializers(model) -> int:
    """Turn the INT4 placeholder nodes of a traced ONNX ``model`` into blocked ``DequantizeLinear`` (opset 21:
    ``axis`` 0, ``block_size`` = the group size) of 4-bit initializers: INT4 (the symmetric code ``q - 8``)
    without zero points, or UINT4 codes with UINT4 zero points.  Their ``(K, N)`` uint8 initializers are
    packed two per byte (ONNX's order: element ``2i`` in the low nibble).  Returns the nodes rewritten."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done: dict[str, int] = {}  # initializer name -> the 4-bit type it became

    def to_4bit(name: str, dtype: int, flip: int) -> None:
        if done.get(name, dtype) != dtype:
            raise ValueError(f"INT4 export: initializer {name} read both as INT4 and as UINT4")
        if name in done:
            return
        if name not in inits:
            raise ValueError(f"INT4 export: the 4-bit codes {name} are computed in the graph, not stored")
        codes = numpy_helper.to_array(inits[name])
        if codes.dtype != np.uint8 or codes.ndim != 2:
            raise ValueError(f"INT4 export: {name} is {codes.dtype} {codes.shape}, expected 2-d uint8 codes")
        flat = codes.reshape(-1) ^ np.uint8(flip)  # flip 8: code q -> two's complement nibble of q - 8
        flat = np.concatenate([flat, np.zeros(flat.size % 2, np.uint8)])
        raw = (flat[0::2] & 0xF) | (flat[1::2] << 4)
        inits[name].CopyFrom(helper.make_tensor(name, dtype, codes.shape, raw.tobytes(), raw=True))
        done[name] = dtype

    count = 0
    for node in model.graph.node:
        if node.domain != INT4_DOMAIN or node.op_type != INT4_OP:
            continue
        symmetric = len(node.input) == 2
        dtype = TensorProto.INT4 if symmetric else TensorProto.UINT4
        to_4bit(node.input[0], dtype, 8 if symmetric else 0)
        if not symmetric:
            to_4bit(node.input[2], dtype, 0)
        block = next(a.i for a in node.attribute if a.name == "block_size")
        node.domain, node.op_type = "", "DequantizeLinear"
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
        count += 1
    for i, op in enumerate(model.opset_import):
        if op.domain == INT4_DOMAIN:
            del model.opset_import[i]
            break
    return count


def quant_opset(network: nn.Module | None, mode: str | None = None) -> tuple[int, str] | None:
    """``(the lowest opset, why)`` for exporting ``network``'s quantized layers (or a plan's quant ``mode``):
    INT4 layers need 21, FP8 layers 19; None when there are none."""
    from ..quant import INT4_MODES, FP8Linear, INT4Linear

    mods = list(network.modules()) if network is not None else []
    if (mode in INT4_MODES) or any(isinstance(m, INT4Linear) for m in mods):
        return INT4_MIN_OPSET, "INT4 / UINT4 weights in a blocked DequantizeLinear (block_size)"
    if mode is not None or any(isinstance(m, FP8Linear) for m in mods):
        return MIN_OPSET, "float8 QuantizeLinear / DequantizeLinear"
    return None


@contextmanager
def qdq_layers(network: nn.Module | None):
    """Within the block, ``network``'s FP8 layers are :class:`QDQLinear` views and its fused DiT blocks run
    unfused; yields the number of layers swapped (0: not quantized).  Restored on exit, errors included."""
    if network is None:
        yield 0
        return
    from ..quant import FP8DiTBlock, FP8Linear, INT4Linear

    swaps, blocks = [], []
    try:
        for parent in list(network.modules()):
            if isinstance(parent, FP8DiTBlock):
                blocks.append((parent, parent.calibrating))
                parent.calibrating = True  # the unfused path: each layer quantizes its own input
            for name, child in list(parent.named_children()):
                if isinstance(child, (FP8Linear, INT4Linear)):
                    view = QDQLinear(child) if isinstance(child, FP8Linear) else QDQInt4Linear(child)
                    setattr(parent, name, view)
                    swaps.append((parent, name, child))
        yield len(swaps)
    finally:
        for parent, name, child in reversed(swaps):
            setattr(parent, name, child)
        for block, was in blocks:
            block.calibrating = was
