"""LayerNorm + adaLN modulation + per-token FP8 quantization in one kernel (a DiT block's GEMM producer).

In a DiT block (adaLN-Zero) the inputs of the q/k/v and first feed-forward GEMMs are
``LayerNorm(x) * (1 + scale[b]) + shift[b]`` (LayerNorm without affine, shift/scale per batch item).  This
kernel reads each token of ``x`` once, normalizes and modulates it in fp32 and writes it straight out as E4M3
with its per-token scale (or with a static per-tensor scale): the bf16 normalized activations never reach
memory and the GEMM reads one byte per element.
"""

from __future__ import annotations

import torch

from .quantize_fp8 import MIN_SCALE, exact_round_needed, quantize_fp8_ref
from .triton_support import check_launch, row_config, tl, triton

__all__ = ["adaln_quant", "adaln_quant_ref", "adaln_modulate_ref"]


if triton is not None:
    from .quantize_fp8 import e4m3

    @triton.jit
    def _adaln_quant_kernel(
        x_ptr,
        shift_ptr,
        scale_ptr,
        q_ptr,
        qscale_ptr,
        tokens,
        D,
        stride_mod,
        eps,
        min_scale,
        STATIC: tl.constexpr,
        EXACT_ROUND: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // tokens
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        sc = tl.load(scale_ptr + b * stride_mod + offs, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + b * stride_mod + offs, mask=mask, other=0.0).to(tl.float32)
        y = xc * rstd * (1.0 + sc) + sh
        if STATIC:
            s = tl.load(qscale_ptr)
        else:
            s = tl.maximum(tl.div_rn(tl.max(tl.abs(tl.where(mask, y, 0.0)), axis=0), 448.0), min_scale)
            tl.store(qscale_ptr + row, s)
        tl.store(q_ptr + row * D + offs, e4m3(tl.div_rn(y, s), EXACT_ROUND), mask=mask)


def _check(x, shift, scale, act_scale):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_contiguous():
        raise ValueError("x: expected a contiguous (batch, tokens, dim) tensor")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x: expected float32 / float16 / bfloat16, got {x.dtype}")
    b, _, d = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or t.shape != (b, d) or t.stride(1) != 1:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected ({b}, {d}) with a contiguous last dimension, got {got}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device}, got {t.device}")
    if shift.stride(0) != scale.stride(0):
        raise ValueError(
            "shift and scale must have the same row stride (e.g. chunks of one modulation tensor)"
        )
    if act_scale is not None and (
        not isinstance(act_scale, torch.Tensor)
        or act_scale.numel() != 1
        or act_scale.dtype != torch.float32
        or act_scale.device != x.device
    ):
        raise ValueError(
            "act_scale: expected a 1-element float32 tensor on x's device (static scale) or None"
        )


def adaln_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
               act_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8(LayerNorm(x) * (1 + scale[:, None]) + shift[:, None])`` in one pass, with Triton.

    x: (batch, tokens, dim) fp32 / fp16 / bf16, contiguous.  shift, scale: (batch, dim), last dimension
    contiguous, same row stride (chunks of the adaLN modulation output are fine).  act_scale: None (dynamic
    per-token scales) or a 1-element fp32 static scale.  Returns ``q: (batch * tokens, dim) float8_e4m3fn``,
    its scale: ``(batch * tokens, 1)`` fp32, or ``act_scale``.
    """
    _check(x, shift, scale, act_scale)
    check_launch(x.device, "adaln_quant")
    b, t, d = x.shape
    launch = row_config(d, "adaln_quant")
    q = torch.empty((b * t, d), dtype=torch.float8_e4m3fn, device=x.device)
    qscale = (
        act_scale if act_scale is not None else torch.empty((b * t, 1), dtype=torch.float32, device=x.device)
    )
    if b * t == 0:
        return q, qscale
    _adaln_quant_kernel[(b * t,)](
        x, shift, scale, q, qscale, t, d, shift.stride(0), float(eps), MIN_SCALE,
        STATIC=act_scale is not None, EXACT_ROUND=exact_round_needed(x.device), BLOCK_D=launch.block,
        num_warps=launch.num_warps,
    )
    return q, qscale


def adaln_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` in fp32, as ``(batch * tokens, dim)``."""
    xf = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    y = xf * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return y.reshape(-1, x.shape[-1])


def adaln_quant_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                   act_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`adaln_quant` (fp32 LayerNorm and modulation, then :func:`quantize_fp8_ref`)."""
    _check(x, shift, scale, act_scale)
    return quantize_fp8_ref(adaln_modulate_ref(x, shift, scale, eps), act_scale)
