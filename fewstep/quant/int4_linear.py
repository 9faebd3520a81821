"""INT4Linear: an ``nn.Linear`` (or 1x1 ``nn.Conv2d``) with group-wise INT4 weights, run as one INT4 GEMM.

Weights are stored packed (``packed: (N, K // 2) uint8``, ``scales: (N, K // G)``, optional ``zeros``: the
format of :mod:`fewstep.kernels.int4_gemm`).  ``input_scale: (K,)`` (optional, from activation-aware
calibration, :mod:`fewstep.quant.int4_calibrate`) is the per-input-channel factor ``s`` the weight was
multiplied by before quantization: the layer computes ``(x / s) @ Q(W * s).T`` (AWQ, Lin et al. 2023).

kind "w4a16": activations stay in the layer's dtype (``int4_gemm``).  kind "w4a8": activations are quantized
per token to E4M3 (``quantize_fp8``) and the GEMM runs on FP8 tensor cores (``w4a8_gemm``).
backend "triton": the Triton kernels; "emulated": their PyTorch references (any device).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.fp8_gemm import ACTIVATIONS, Fp8GemmConfig
from ..kernels.int4_gemm import (
    int4_config,
    int4_gemm,
    int4_gemm_ref,
    quantize_int4_ref,
    w4a8_gemm,
    w4a8_gemm_ref,
)
from ..kernels.quantize_fp8 import quantize_fp8, quantize_fp8_ref

__all__ = ["INT4Linear", "INT4Conv1x1", "INT4_KINDS", "int4_weight_bytes"]

INT4_KINDS = ("w4a16", "w4a8")
_BACKENDS = ("triton", "emulated")


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scales in the layer's half dtype (bf16 / fp16), fp32 for fp32 layers (CPU)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def int4_weight_bytes(
    n: int,
    k: int,
    group_size: int,
    *,
    zero_point: bool = False,
    scale_bytes: int = 2,
    input_scale: bool = False,
) -> int:
    """Bytes of an (N, K) INT4 weight: packed codes, scales, zero points, the AWQ input scale (fp32)."""
    groups = n * (k // group_size)
    return n * k // 2 + groups * scale_bytes + (groups if zero_point else 0) + (4 * k if input_scale else 0)


class INT4Linear(nn.Module):
    """``y = act(x @ W.T + b)`` with W in group-wise INT4.  x: (..., in_features), any float dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group_size: int = 128,
        zero_point: bool = False,
        bias: bool = True,
        activation: str | None = None,
        kind: str = "w4a16",
        backend: str = "triton",
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if kind not in INT4_KINDS:
            raise ValueError(f"kind must be one of {INT4_KINDS}, got {kind!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if in_features % 16 or out_features % 16:
            raise ValueError(
                f"INT4Linear needs in_features and out_features multiples of 16, got "
                f"({in_features}, {out_features})"
            )
        if in_features % group_size:
            raise ValueError(f"in_features = {in_features} is not a multiple of the group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.activation, self.kind, self.backend, self.out_dtype = activation, kind, backend, dtype
        groups = in_features // group_size
        self.register_buffer(
            "packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales", torch.ones(out_features, groups, dtype=_scale_dtype(dtype), device=device)
        )
        self.register_buffer(
            "zeros",
            torch.zeros(out_features, groups, dtype=torch.uint8, device=device) if zero_point else None,
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_scale", None)  # (K,) fp32: AWQ's per-input-channel factor
        self.configs: dict[int, Fp8GemmConfig] = {}  # launch config per M, resolved on first call
        self.tune = False  # accepted for symmetry with FP8Linear; INT4 configs come from the size heuristic

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        group_size: int = 128,
        zero_point: bool = False,
        activation: str | None = None,
        kind: str = "w4a16",
        backend: str = "triton",
        input_scale: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
    ) -> "INT4Linear":
        """Quantize an ``nn.Linear`` round-to-nearest (after ``W * input_scale`` and with per-group ``clip``
        when calibration found them)."""
        w = linear.weight
        return cls._from_weight(
            w,
            linear.bias,
            group_size=group_size,
            zero_point=zero_point,
            activation=activation,
            kind=kind,
            backend=backend,
            input_scale=input_scale,
            clip=clip,
        )

    @classmethod
    def _from_weight(cls, w, b, *, group_size, zero_point, activation, kind, backend, input_scale, clip):
        w2 = w.detach().reshape(w.shape[0], -1)
        dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        mod = cls(
            w2.shape[1],
            w2.shape[0],
            group_size=group_size,
            zero_point=zero_point,
            bias=b is not None,
            activation=activation,
            kind=kind,
            backend=backend,
            dtype=dtype,
            device=w.device,
        )
        wf = w2.float()
        if input_scale is not None:
            input_scale = input_scale.detach().float().to(w.device).reshape(-1).contiguous()
            if input_scale.numel() != wf.shape[1] or not bool((input_scale > 0).all()):
                raise ValueError(f"input_scale: expected {wf.shape[1]} positive factors")
            wf = wf * input_scale
            mod.input_scale = input_scale
        mod.packed, mod.scales, zeros = quantize_int4_ref(
            wf, group_size, zero_point=zero_point, scale_dtype=_scale_dtype(dtype), clip=clip
        )
        if zeros is not None:
            mod.zeros = zeros
        if b is not None:
            mod.bias = b.detach().to(dtype).clone()
        return mod

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``act(x @ W.T + b)``; with ``residual`` and ``gate``: ``residual + gate[row // tokens] * act(...)``
        fused into the GEMM's epilogue (as :class:`~fewstep.quant.FP8Linear`)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"INT4Linear({self.in_features}, {self.out_features}): input has {x.shape[-1]} features"
            )
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x2 = x2 / self.input_scale.to(x2.dtype)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if residual is not None:
            residual = residual.reshape(-1, self.out_features).contiguous()
        kw = dict(activation=self.activation, out_dtype=self.out_dtype, residual=residual, gate=gate)
        emulated = self.backend == "emulated"
        if not emulated:
            m = x2.shape[0]
            kw["config"] = self.configs.get(m) or self.configs.setdefault(
                m, int4_config(self.kind, m, self.group_size, x2.device)
            )
        if self.kind == "w4a8":
            q, s = (quantize_fp8_ref if emulated else quantize_fp8)(x2)
            y = (w4a8_gemm_ref if emulated else w4a8_gemm)(
                q, s, self.packed, self.scales, self.zeros, self.bias, **kw
            )
        else:
            if x2.dtype != self.out_dtype and self.out_dtype in (
                torch.bfloat16,
                torch.float16,
                torch.float32,
            ):
                x2 = x2.to(self.out_dtype)
            y = (int4_gemm_ref if emulated else int4_gemm)(
                x2, self.packed, self.scales, self.zeros, self.bias, **kw
            )
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
            f"{act}, group_size={self.group_size}, zero_point={self.zeros is not None}, "
            f"awq={self.input_scale is not None}, kind={self.kind}, backend={self.backend}"
        )


class INT4Conv1x1(INT4Linear):
    """A 1x1, stride-1, ungrouped ``nn.Conv2d`` as an INT4 GEMM over pixels.  x: (B, C, H, W)."""

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        group_size: int = 128,
        zero_point: bool = False,
        kind: str = "w4a16",
        backend: str = "triton",
        input_scale: torch.Tensor | None = None,
        clip: torch.Tensor | None = None,
    ) -> "INT4Conv1x1":
        return cls._from_weight(
            conv.weight,
            conv.bias,
            group_size=group_size,
            zero_point=zero_point,
            activation=None,
            kind=kind,
            backend=backend,
            input_scale=input_scale,
            clip=clip,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_features:
            raise ValueError(f"INT4Conv1x1: expected (B, {self.in_features}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        y = super().forward(x.permute(0, 2, 3, 1))
        return y.reshape(b, h, w, self.out_features).permute(0, 3, 1, 2)
