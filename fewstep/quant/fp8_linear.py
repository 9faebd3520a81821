"""FP8Linear: an ``nn.Linear`` (or 1x1 ``nn.Conv2d``) with E4M3 weights, run as one FP8 GEMM.

Weights are stored quantized per output channel (``weight: (N, K) float8_e4m3fn``, ``weight_scale: (N,)``);
activations are quantized per token at run time (``act_scale`` None) or with a static per-tensor scale
(``act_scale: (1,)`` fp32, from :func:`fewstep.quant.calibrate`).  Bias and GELU run in the GEMM epilogue and
the output has the original layer's dtype.

backend "triton": the Triton kernels (CUDA with FP8 tensor cores; CPU under ``TRITON_INTERPRET=1``).
backend "emulated": the kernels' PyTorch references, which compute the same quantized numbers with fp32 math
(any device; what ``quant="fp8-emulated"`` runs).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.fp8_gemm import (
    ACTIVATIONS,
    Fp8GemmConfig,
    epilogue_of,
    fp8_gemm,
    fp8_gemm_ref,
    resolve_config,
)
from ..kernels.quantize_fp8 import quantize_fp8, quantize_fp8_ref

__all__ = ["FP8Linear", "FP8Conv1x1", "BACKENDS", "quantize_weight"]

BACKENDS = ("triton", "emulated")
_ACTIVATIONS = tuple(a for a in ACTIVATIONS)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) float8_e4m3fn and (N,) fp32 per-output-channel scales."""
    q, s = quantize_fp8_ref(weight.detach().reshape(weight.shape[0], -1))
    return q.contiguous(), s.reshape(-1).contiguous()


class FP8Linear(nn.Module):
    """``y = act(x @ W.T + b)`` with W and x in E4M3.  x: (..., in_features), any float dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        activation: str | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
        backend: str = "triton",
        device=None,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if in_features % 16 or out_features % 16:
            raise ValueError(
                f"FP8Linear needs in_features and out_features multiples of 16, got "
                f"({in_features}, {out_features})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.activation, self.out_dtype, self.backend = activation, out_dtype, backend
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=out_dtype, device=device) if bias else None
        )
        self.register_buffer("act_scale", None)  # (1,) fp32 when static
        self.configs: dict[
            int, Fp8GemmConfig
        ] = {}  # launch config per M, resolved on first call (plan build)
        self.tune = False
        self.observer = None  # calibration hook: observer(module, x2d) sees every input

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        activation: str | None = None,
        backend: str = "triton",
        out_dtype: torch.dtype | None = None,
    ) -> "FP8Linear":
        """Quantize an ``nn.Linear`` (weights per output channel); ``activation`` is fused after it."""
        w = linear.weight
        mod = cls(
            w.shape[1],
            w.shape[0],
            bias=linear.bias is not None,
            activation=activation,
            out_dtype=out_dtype or _float_dtype(w.dtype),
            backend=backend,
            device=w.device,
        )
        mod.weight, mod.weight_scale = quantize_weight(w)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().to(mod.out_dtype).clone()
        return mod

    @property
    def static(self) -> bool:
        return self.act_scale is not None

    def set_act_scale(self, scale: float | None) -> None:
        """Use a static per-tensor activation scale (None: back to dynamic per-token scales).

        A layer that already has a static scale keeps its tensor and gets the new value copied in: CUDA graphs
        and plans built earlier read that tensor's address, so it must never be replaced while they live.
        """
        if scale is None:
            self.act_scale = None
        elif not scale > 0 or scale != scale or scale == float("inf"):
            raise ValueError(f"activation scale must be a positive finite number, got {scale}")
        elif self.act_scale is not None and self.act_scale.device == self.weight.device:
            with torch.no_grad():
                self.act_scale.fill_(float(scale))
        else:
            self.act_scale = torch.full((1,), float(scale), dtype=torch.float32, device=self.weight.device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``act(x @ W.T + b)``; with ``residual`` (x.shape[:-1] + (N,)) and ``gate`` ((B, N), x's rows a
        multiple of B): ``residual + gate[row // tokens] * act(...)``, fused into the GEMM's epilogue."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"FP8Linear({self.in_features}, {self.out_features}): input has {x.shape[-1]} features"
            )
        x2 = x.reshape(-1, self.in_features)
        if self.observer is not None:
            self.observer(self, x2)
        q, s = self.quantize_input(x2)
        if residual is not None:
            residual = residual.reshape(-1, self.out_features).contiguous()
        y = self.forward_quantized(q, s, residual=residual, gate=gate)
        return y.reshape(*x.shape[:-1], self.out_features)

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        quant = quantize_fp8 if self.backend == "triton" else quantize_fp8_ref
        return quant(x2, self.act_scale)

    def forward_quantized(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        *,
        residual: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The GEMM on an already quantized input (q: (M, K) E4M3, scale: (M, 1) or (1,)) -> (M, N)."""
        m = q.shape[0]
        if self.backend == "emulated":
            return fp8_gemm_ref(
                q,
                scale,
                self.weight,
                self.weight_scale,
                self.bias,
                activation=self.activation,
                out_dtype=self.out_dtype,
                residual=residual,
                gate=gate,
            )
        cfg = self.configs.get(m)
        if cfg is None:
            epilogue = epilogue_of(self.activation, self.bias is not None, residual is not None)
            cfg = self.configs[m] = resolve_config(
                m, self.out_features, self.in_features, q.device, tune=self.tune, epilogue=epilogue
            )
        return fp8_gemm(
            q,
            scale,
            self.weight,
            self.weight_scale,
            self.bias,
            activation=self.activation,
            out_dtype=self.out_dtype,
            config=cfg,
            residual=residual,
            gate=gate,
        )

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        mode = "static" if self.static else "per-token"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
            f"{act}, activations={mode}, backend={self.backend}"
        )


class FP8Conv1x1(FP8Linear):
    """A 1x1, stride-1, ungrouped ``nn.Conv2d`` as an FP8 GEMM over pixels.  x: (B, C, H, W)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, backend: str = "triton") -> "FP8Conv1x1":
        w = conv.weight
        mod = cls(
            w.shape[1],
            w.shape[0],
            bias=conv.bias is not None,
            out_dtype=_float_dtype(w.dtype),
            backend=backend,
            device=w.device,
        )
        mod.weight, mod.weight_scale = quantize_weight(w.reshape(w.shape[0], w.shape[1]))
        if conv.bias is not None:
            mod.bias = conv.bias.detach().to(mod.out_dtype).clone()
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_features:
            raise ValueError(f"FP8Conv1x1: expected (B, {self.in_features}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        y = super().forward(x.permute(0, 2, 3, 1))  # channels last: pixels are the GEMM's rows
        return y.reshape(b, h, w, self.out_features).permute(0, 3, 1, 2)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
