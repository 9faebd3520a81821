"""Per-token FP8 (E4M3) activation quantization: absmax -> scale -> saturating cast, in one pass.

``q, scale = quantize_fp8(x)`` turns ``x: (M, K)`` into ``q: (M, K) float8_e4m3fn`` and ``scale: (M, 1) fp32``
with ``x ~= q * scale``: each row (token) is read once, its absmax gives ``scale = absmax / 448`` and the row
is divided by it and cast with saturation.  With a given per-tensor ``scale`` (static, calibrated) the kernel
only divides and casts.  The cast rounds to nearest even, as the hardware does (``cvt.rn.satfinite``).

Triton's interpreter (CPU tests) rounds fp32 -> fp8 half-up and drops the carry when the mantissa rounds over
to the next power of two (126.0 -> 64.0 instead of 128.0; triton 3.9, ``interpreter._convert_float``).  Under
the interpreter :func:`e4m3` therefore snaps the value onto the E4M3 grid in fp32 first (exact
round-to-nearest-even), so the cast it then does is exact.  Triton <= 3.6 compiling for sm_89 (Ada) lowers the
cast through fp16 (fp32 -> fp16 -> e4m3: a double rounding, about 0.4% of values one E4M3 step off); after
the same snap both steps are exact, so :func:`exact_round_needed` asks for it there too.  Compiled for sm_90,
or by Triton 3.9 for sm_89, the cast is one ``cvt.rn.satfinite.e4m3x2.f32`` (tests/kernels/test_fp8_aot.py
checks which Triton does what).  Divisions use ``tl.div_rn`` (IEEE round-to-nearest): a compiled ``/`` is
``div.full.f32`` (approximate), and the scales and E4M3 bits must equal PyTorch's.
"""

from __future__ import annotations

import torch

from .triton_support import MAX_ROW, check_launch, interpreting, row_config, tl, triton

# MAX_ROW and interpreting live in triton_support; they stay importable from here
__all__ = ["quantize_fp8", "quantize_fp8_ref", "E4M3_MAX", "MIN_SCALE", "MAX_ROW", "round_e4m3_ref",
           "interpreting", "exact_round_needed", "triton_version"]

E4M3_MAX = 448.0
# absmax floor: an all-zero row gets a tiny positive scale (and q = 0) instead of 0/0
MIN_SCALE = 1e-12
# the first Triton whose sm_89 cast fp32 -> e4m3 is not lowered through fp16 (3.6 does, 3.9 does not; 3.7
# and 3.8 are treated like 3.6 until checked: the snap only costs a few instructions)
_DIRECT_E4M3_CAST_SM89 = (3, 9)


def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor); (0, 0) without Triton."""
    if triton is None:
        return (0, 0)
    parts = triton.__version__.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def exact_round_needed(device: torch.device | str | None = None, *, capability: tuple[int, int] | None = None,
                       interpreted: bool | None = None) -> bool:
    """Whether the kernels must snap values onto the E4M3 grid before casting (module docstring): under the
    interpreter, and on GPUs below sm_90 with a Triton that casts through fp16.  ``capability`` overrides
    ``device``'s (ahead-of-time compiles)."""
    if interpreted if interpreted is not None else interpreting():
        return True
    if capability is None:
        dev = torch.device(device) if device is not None else None
        if dev is None or dev.type != "cuda":
            return False
        capability = torch.cuda.get_device_capability(dev)
    return tuple(capability) < (9, 0) and triton_version() < _DIRECT_E4M3_CAST_SM89


if triton is not None:

    @triton.jit
    def e4m3(x, EXACT_ROUND: tl.constexpr):
        """fp32 -> float8e4nv with saturation to +-448 and round-to-nearest-even."""
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        if EXACT_ROUND:  # the interpreter's cast is not RNE (module docstring): snap to the grid first
            bits = x.to(tl.int32, bitcast=True)
            e = ((bits >> 23) & 0xFF) - 127
            e = tl.maximum(e, -6) - 3  # E4M3: 3 mantissa bits, smallest normal exponent -6
            ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
            r = x * ((127 - e) << 23).to(tl.float32, bitcast=True)  # x / ulp, exact (a power of two)
            r = (r + 12582912.0) - 12582912.0  # 1.5 * 2**23: fp32 addition rounds r to the nearest even int
            x = r * ulp
        return x.to(tl.float8e4nv)

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        K,
        stride_xm,
        min_scale,
        STATIC: tl.constexpr,
        EXACT_ROUND: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(scale_ptr)
        else:
            scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), 448.0), min_scale)
            tl.store(scale_ptr + row, scale)
        tl.store(q_ptr + row * K + offs, e4m3(tl.div_rn(x, scale), EXACT_ROUND), mask=mask)


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a 2-d (tokens, features) tensor, got {got}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: expected float32 / float16 / bfloat16, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(
            f"{name}: the feature dimension must be contiguous (stride 1), got strides {x.stride()}"
        )


def _check_static_scale(scale, x) -> None:
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError("scale: expected a 1-element float32 tensor (a static per-tensor scale)")
    if scale.device != x.device:
        raise ValueError(f"scale: expected device {x.device}, got {scale.device}")


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to E4M3 with the Triton kernel.

    x: (tokens, features) fp32 / fp16 / bf16, feature dimension contiguous.  scale: None for dynamic per-token
    scales, or a 1-element fp32 tensor (static per-tensor scale, e.g. calibrated).  Returns ``q: (tokens,
    features) float8_e4m3fn`` (contiguous) and the scale: ``(tokens, 1)`` fp32 (dynamic) or ``scale`` itself.
    """
    _check_x(x)
    check_launch(x.device, "quantize_fp8")
    m, k = x.shape
    launch = row_config(k, "quantize_fp8")
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    if scale is None:
        out_scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    else:
        _check_static_scale(scale, x)
        out_scale = scale
    if m == 0:
        return q, out_scale
    _quantize_rows_kernel[(m,)](
        x, q, out_scale, k, x.stride(0), MIN_SCALE,
        STATIC=scale is not None, EXACT_ROUND=exact_round_needed(x.device), BLOCK_K=launch.block,
        num_warps=launch.num_warps,
    )
    return q, out_scale


def round_e4m3_ref(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of fp32 ``x`` to float8_e4m3fn (torch's cast after a clamp)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_fp8_ref(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`quantize_fp8` (same contract, same math in fp32)."""
    _check_x(x)
    xf = x.float()
    if scale is None:
        scale = (xf.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(MIN_SCALE)
        return round_e4m3_ref(xf / scale), scale
    _check_static_scale(scale, x)
    return round_e4m3_ref(xf / scale.reshape(())), scale
