"""INT4 weights: packing, and the W4A16 / W4A8 GEMMs that dequantize them in registers.

Weight format (what :func:`quantize_int4_ref` makes and the kernels read), for ``W: (N, K)`` (the layout of
``nn.Linear.weight``) and a group size ``G`` (64 or 128, dividing K):

* ``packed: (N, K // 2) uint8``: byte ``j`` of row ``n`` holds ``q[n, 2j]`` in its low nibble and
  ``q[n, 2j + 1]`` in its high nibble, ``q`` unsigned in [0, 15].  Rows stay K-major like the FP8 weights: a
  tile of ``BLOCK_K // 2`` bytes per output channel is one contiguous load, unpacked with a shift and a mask
  and interleaved back along K (``tl.join`` + reshape).
* ``scales: (N, K // G)``, bf16 / fp16 / fp32: one scale per output channel and group of G inputs.
* ``zeros``: None (symmetric: the zero point is 8, ``q - 8`` in [-8, 7]) or ``(N, K // G) uint8`` zero points
  in [0, 15] (asymmetric).  ``W ~= (q - zero) * scale``.

``int4_gemm`` (W4A16): ``a: (M, K)`` bf16 / fp16 / fp32; each K step dequantizes a ``(BLOCK_K, BLOCK_N)`` tile
of W in registers to a's dtype and runs ``tl.dot`` with fp32 accumulation.

``w4a8_gemm`` (W4A8): ``a`` is E4M3 with per-token (or per-tensor) scales, from
:func:`fewstep.kernels.quantize_fp8.quantize_fp8`; ``q - zero`` (an integer in [-15, 15]) is exact in E4M3,
so each K step is an FP8 ``tl.dot`` of one weight group, scaled by that group's scales and added to the fp32
accumulator (``BLOCK_K`` divides G).  The per-token activation scale is applied in the epilogue.

Both share the FP8 GEMM's epilogue (:func:`fewstep.kernels.fp8_gemm._epilogue_store`: bias, GELU, adaLN-Zero
gated residual) and its launch-config-as-data (:class:`~fewstep.kernels.fp8_gemm.Fp8GemmConfig`).  Every
launcher sits beside its plain-PyTorch ``_ref``.
"""

from __future__ import annotations

import functools

import torch

from .fp8_gemm import (
    ACTIVATIONS,
    INTERPRETER_CONFIG,
    Fp8GemmConfig,
    _check_gated,
    has_fp8_tensor_cores,
)
from .triton_support import check_launch, interpreting, tl, triton

if triton is not None:
    from .fp8_gemm import _epilogue_store, _tile_ids

__all__ = [
    "pack_int4",
    "pack_int4_ref",
    "unpack_int4",
    "unpack_int4_ref",
    "quantize_int4_ref",
    "dequantize_int4_ref",
    "int4_gemm",
    "int4_gemm_ref",
    "w4a8_gemm",
    "w4a8_gemm_ref",
    "INT4_GEMM_CONFIGS",
    "int4_config",
    "GROUP_SIZES",
    "SYMMETRIC_ZERO",
]

GROUP_SIZES = (32, 64, 128, 256)
SYMMETRIC_ZERO = 8
_SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Candidates for GPUs.  NOT YET MEASURED on a GPU: W4A16 tiles follow the FP8 set with BLOCK_K = 64 (one
# group of 64 bf16 = 128 bytes of A per K step), small-M tiles for the memory-bound batch-1 projections; W4A8
# tiles keep BLOCK_K = 128 (one group of 128, 128 bytes of E4M3) like the FP8 GEMM.
INT4_GEMM_CONFIGS: dict[str, tuple[Fp8GemmConfig, ...]] = {
    "w4a16": (
        Fp8GemmConfig(16, 64, 64, 8, num_warps=4, num_stages=4),
        Fp8GemmConfig(64, 128, 64, 8, num_warps=4, num_stages=4),
        Fp8GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=3),
        Fp8GemmConfig(128, 256, 64, 8, num_warps=8, num_stages=3),
    ),
    "w4a8": (
        Fp8GemmConfig(16, 64, 128, 8, num_warps=4, num_stages=4),
        Fp8GemmConfig(64, 128, 128, 8, num_warps=4, num_stages=4),
        Fp8GemmConfig(128, 128, 128, 8, num_warps=8, num_stages=3),
        Fp8GemmConfig(128, 256, 128, 8, num_warps=8, num_stages=3),
    ),
}


def int4_config(kind: str, m: int, group_size: int, device: torch.device | str) -> Fp8GemmConfig:
    """The launch config of an ``int4_gemm`` ("w4a16") or ``w4a8_gemm`` ("w4a8") with M rows: the
    interpreter's small tiles on CPU, else a size heuristic (small tiles for M <= 16, 64 rows up to 256, 128
    above; the widest tile from M >= 4096), with BLOCK_K cut to the group size."""
    if kind not in INT4_GEMM_CONFIGS:
        raise ValueError(f"kind must be one of {tuple(INT4_GEMM_CONFIGS)}, got {kind!r}")
    if torch.device(device).type != "cuda":
        cfg = INTERPRETER_CONFIG
    else:
        i = 0 if m <= 16 else 1 if m <= 256 else 2 if m < 4096 else 3
        cfg = INT4_GEMM_CONFIGS[kind][i]
    if cfg.block_k > group_size:
        cfg = Fp8GemmConfig(cfg.block_m, cfg.block_n, group_size, cfg.group_m, cfg.num_warps, cfg.num_stages)
    return cfg


if triton is not None:

    @triton.jit
    def _pack_int4_kernel(q_ptr, out_ptr, total, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        lo = tl.load(q_ptr + 2 * offs, mask=mask, other=0)
        hi = tl.load(q_ptr + 2 * offs + 1, mask=mask, other=0)
        tl.store(out_ptr + offs, (lo & 0xF) | ((hi & 0xF) << 4), mask=mask)

    @triton.jit
    def _unpack_int4_kernel(p_ptr, out_ptr, total, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        p = tl.load(p_ptr + offs, mask=mask, other=0)
        tl.store(out_ptr + 2 * offs, p & 0xF, mask=mask)
        tl.store(out_ptr + 2 * offs + 1, (p >> 4) & 0xF, mask=mask)

    @triton.jit
    def _load_int4_tile(
        w_ptr,
        z_ptr,
        offs_n,
        offs_kk,
        N,
        K,
        k0,
        G: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """``q - zero`` of the (BLOCK_K, BLOCK_N) tile of W^T at K offset k0, as int32 in [-15, 15]."""
        # packed bytes: (BLOCK_K // 2, BLOCK_N), K-major rows of K // 2 bytes
        ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * (K // 2) + (k0 // 2 + offs_kk)[:, None]
        mask = (offs_n[None, :] < N) & (offs_kk[:, None] < (K - k0) // 2)
        p = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        # interleave low (even k) and high (odd k) nibbles back along K: (BLOCK_K // 2, 2, BLOCK_N)
        q = tl.reshape(tl.permute(tl.join(p & 0xF, (p >> 4) & 0xF), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        if HAS_ZERO:
            z = tl.load(z_ptr + offs_n.to(tl.int64) * (K // G) + k0 // G, mask=offs_n < N, other=0)
            q = q - z.to(tl.int32)[None, :]
        else:
            q = q - 8
        return q

    @triton.jit
    def _int4_gemm_kernel(
        a_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        a_scale_ptr,
        w_scale_ptr,
        bias_ptr,
        res_ptr,
        gate_ptr,
        tokens,
        gate_stride,
        M,
        N,
        K,
        stride_am,
        W4A8: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        G: tl.constexpr,
        UPCAST: tl.constexpr,
        ROW_SCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        GELU: tl.constexpr,
        GATED_RES: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_kk = tl.arange(0, BLOCK_K // 2)
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        s_ptrs = s_ptr + offs_n.to(tl.int64) * (K // G)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides G divides K: no K mask, one group per step
            a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)
            q = _load_int4_tile(w_ptr, z_ptr, offs_n, offs_kk, N, K, k0, G, HAS_ZERO, BLOCK_K, BLOCK_N)
            s = tl.load(s_ptrs + k0 // G, mask=offs_n < N, other=0.0).to(tl.float32)
            if W4A8:  # integers in [-15, 15] are exact in E4M3: an FP8 MMA per group, scaled in fp32
                acc += tl.dot(a, q.to(tl.float32).to(tl.float8e4nv)) * s[None, :]
            else:  # dequantize to a's dtype, then the MMA
                w = (q.to(tl.float32) * s[None, :]).to(a_ptr.dtype.element_ty)
                if UPCAST:  # the interpreter's bf16 tl.dot is wrong (triton 3.9): the same products in fp32
                    acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
                else:
                    acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
        _epilogue_store(
            acc,
            offs_m,
            offs_n,
            out_ptr,
            M,
            N,
            a_scale_ptr,
            w_scale_ptr,
            bias_ptr,
            res_ptr,
            gate_ptr,
            tokens,
            gate_stride,
            ROW_SCALE,
            HAS_BIAS,
            GELU,
            GATED_RES,
        )


# ---------------------------------------------------------------------------------------------- packing


def _check_codes(q: torch.Tensor) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.dtype != torch.uint8:
        got = f"{tuple(q.shape)} {q.dtype}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q: expected a 2-d uint8 tensor of 4-bit codes, got {got}")
    if q.shape[1] % 2:
        raise ValueError(f"q: expected an even number of columns (two codes per byte), got {q.shape[1]}")


def _check_packed(p: torch.Tensor) -> None:
    if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.dtype != torch.uint8:
        got = f"{tuple(p.shape)} {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
        raise ValueError(f"packed: expected a 2-d uint8 tensor (two 4-bit codes per byte), got {got}")


_PACK_BLOCK = 1024


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> (N, K // 2) uint8, ``q[:, 2j]`` in the low nibble of byte j (Triton).
    Codes above 15 are a ValueError (checked on the host: packing is a one-off at quantization time)."""
    _check_codes(q)
    check_launch(q.device, "pack_int4")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"q: 4-bit codes must be in [0, 15], got a maximum of {int(q.max())}")
    q = q.contiguous()
    out = torch.empty((q.shape[0], q.shape[1] // 2), dtype=torch.uint8, device=q.device)
    if out.numel():
        _pack_int4_kernel[(triton.cdiv(out.numel(), _PACK_BLOCK),)](q, out, out.numel(), BLOCK=_PACK_BLOCK)
    return out


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`pack_int4`."""
    _check_codes(q)
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"q: 4-bit codes must be in [0, 15], got a maximum of {int(q.max())}")
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 codes in [0, 15]: the inverse of :func:`pack_int4` (Triton)."""
    _check_packed(packed)
    check_launch(packed.device, "unpack_int4")
    packed = packed.contiguous()
    out = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.uint8, device=packed.device)
    if packed.numel():
        _unpack_int4_kernel[(triton.cdiv(packed.numel(), _PACK_BLOCK),)](
            packed, out, packed.numel(), BLOCK=_PACK_BLOCK
        )
    return out


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`unpack_int4`."""
    _check_packed(packed)
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# ------------------------------------------------------------------------------------------ quantization


def _check_group(k: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"K = {k} is not a multiple of the group size {group_size}")


def quantize_int4_ref(
    w: torch.Tensor,
    group_size: int = 128,
    *,
    zero_point: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    clip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest group-wise INT4 quantization of ``w: (N, K)``: ``(packed, scales, zeros)``.

    Symmetric (default): ``scale = absmax / 7`` per group (in ``scale_dtype``), ``q = clamp(round(w / scale),
    -8, 7) + 8``.  ``zero_point=True``: ``scale = (max - min) / 15``, ``zero = clamp(round(-min / scale), 0,
    15)``, ``q = clamp(round(w / scale) + zero, 0, 15)``.  The rounding uses the stored (``scale_dtype``)
    scale.  clip: optional ``(N, K // G)`` factors in (0, 1] shrinking each group's range (a clip search)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a 2-d floating-point (N, K) weight, got {getattr(w, 'shape', w)}")
    n, k = w.shape
    _check_group(k, group_size)
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {scale_dtype}")
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    tiny = torch.finfo(torch.float16).tiny  # scales stay normal numbers in every scale dtype
    if zero_point:
        hi, lo = wg.amax(-1).clamp_min(0), wg.amin(-1).clamp_max(0)
        if clip is not None:
            hi, lo = hi * clip, lo * clip
        scale = ((hi - lo) / 15).clamp_min(tiny).to(scale_dtype)
        s = scale.float()
        zero = torch.round(-lo / s).clamp(0, 15)
        q = torch.round(wg / s[..., None]) + zero[..., None]
        zeros = zero.to(torch.uint8).contiguous()
    else:
        amax = wg.abs().amax(-1)
        if clip is not None:
            amax = amax * clip
        scale = (amax / 7).clamp_min(tiny).to(scale_dtype)
        s = scale.float()
        q = torch.round(wg / s[..., None]).clamp(-8, 7) + SYMMETRIC_ZERO
        zeros = None
    q = q.clamp(0, 15).to(torch.uint8).reshape(n, k)
    return pack_int4_ref(q), scale.contiguous(), zeros


def dequantize_int4_ref(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, K) fp32 ``(q - zero) * scale`` of a packed INT4 weight."""
    q = unpack_int4_ref(packed).float()
    n, k = q.shape
    g = k // scales.shape[1]
    z = zeros.float() if zeros is not None else torch.full_like(scales, SYMMETRIC_ZERO, dtype=torch.float32)
    return ((q.reshape(n, -1, g) - z[..., None]) * scales.float()[..., None]).reshape(n, k)


# ----------------------------------------------------------------------------------------------- GEMMs


def _check_weight(packed, scales, zeros, k_a, device):
    _check_packed(packed)
    n, k = packed.shape[0], packed.shape[1] * 2
    if k != k_a:
        raise ValueError(
            f"a has K = {k_a} but the packed weight (N, K // 2) = {tuple(packed.shape)} has K = {k}"
        )
    if k % 16 or n % 16:
        raise ValueError(f"INT4 GEMMs need K and N multiples of 16, got K={k}, N={n}")
    if (
        not isinstance(scales, torch.Tensor)
        or scales.dim() != 2
        or scales.shape[0] != n
        or not scales.shape[1]
    ):
        raise ValueError(f"scales: expected ({n}, K // group_size), got {getattr(scales, 'shape', scales)}")
    if scales.dtype not in _SCALE_DTYPES:
        raise ValueError(f"scales: expected one of {_SCALE_DTYPES}, got {scales.dtype}")
    if k % scales.shape[1]:
        raise ValueError(f"scales: {scales.shape[1]} groups do not divide K = {k}")
    g = k // scales.shape[1]
    _check_group(k, g)
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != torch.uint8):
        raise ValueError(
            f"zeros: expected a {tuple(scales.shape)} uint8 tensor or None, got "
            f"{tuple(zeros.shape)} {zeros.dtype}"
        )
    for name, t in (("packed", packed), ("scales", scales), ("zeros", zeros)):
        if t is not None and (t.device != device or not t.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous tensor on {device}")
    return n, k, g


def _check_common(bias, activation, out_dtype, n, device):
    if bias is not None and (
        not isinstance(bias, torch.Tensor)
        or bias.numel() != n
        or not bias.is_floating_point()
        or bias.device != device
    ):
        raise ValueError(f"bias: expected a floating-point tensor with {n} elements on {device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")


@functools.cache
def _ones(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32, device=device)


def _launch(
    a,
    a_scale,
    packed,
    scales,
    zeros,
    bias,
    activation,
    out_dtype,
    config,
    out,
    residual,
    gate,
    *,
    w4a8,
    n,
    k,
    g,
    tokens,
):
    m = a.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous() or out.device != a.device:
        raise ValueError(f"out: expected a contiguous ({m}, {n}) {out_dtype} tensor on {a.device}")
    if m == 0:
        return out
    cfg = config or int4_config("w4a8" if w4a8 else "w4a16", m, g, a.device)
    if g % cfg.block_k or cfg.block_k % 16:
        raise ValueError(
            f"config.block_k = {cfg.block_k} must be a multiple of 16 dividing the group size {g}"
        )
    ones = _ones(n, a.device)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    _int4_gemm_kernel[(tiles,)](
        a,
        packed,
        scales,
        zeros if zeros is not None else packed,
        out,
        a_scale if a_scale is not None else ones,
        ones,
        bias if bias is not None else ones,
        residual if residual is not None else ones,
        gate if gate is not None else ones,
        tokens,
        gate.stride(0) if gate is not None else 0,
        m,
        n,
        k,
        a.stride(0),
        W4A8=w4a8,
        HAS_ZERO=zeros is not None,
        G=g,
        UPCAST=interpreting() and a.dtype == torch.bfloat16,
        ROW_SCALE=a_scale is not None and a_scale.numel() > 1,
        HAS_BIAS=bias is not None,
        GELU=ACTIVATIONS.index(activation),
        GATED_RES=residual is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _check_a16(a):
    if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.dtype not in _SCALE_DTYPES:
        got = f"{tuple(a.shape)} {a.dtype}" if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(f"a: expected a 2-d bfloat16 / float16 / float32 tensor, got {got}")
    if a.stride(1) != 1:
        raise ValueError(f"a: the K dimension must be contiguous (stride 1), got strides {a.stride()}")


def _check_a8(a, a_scale):
    if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.dtype != torch.float8_e4m3fn:
        got = f"{tuple(a.shape)} {a.dtype}" if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(f"a: expected a 2-d float8_e4m3fn tensor, got {got}")
    if a.stride(1) != 1:
        raise ValueError(f"a: the K dimension must be contiguous (stride 1), got strides {a.stride()}")
    m = a.shape[0]
    if (
        not isinstance(a_scale, torch.Tensor)
        or a_scale.dtype != torch.float32
        or a_scale.numel() not in (1, m)
    ):
        raise ValueError(f"a_scale: expected float32 with {m} (per token) or 1 (per tensor) elements")
    if not a_scale.is_contiguous() or a_scale.device != a.device:
        raise ValueError(f"a_scale: expected a contiguous tensor on {a.device}")


def int4_gemm(
    a: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Fp8GemmConfig | None = None,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A16: ``act(a @ W.T + bias)`` with ``W = (q - zero) * scale`` dequantized in registers (Triton).

    a: (M, K) bf16 / fp16 / fp32 with stride 1 along K (fp32 runs ``tl.dot`` at Triton's default precision,
    TF32 on the tensor cores: about 10 mantissa bits per operand, as the fp32 tests' GPU floors model).
    packed, scales, zeros: the module docstring's format.
    residual / gate: the adaLN-Zero gated residual of :func:`fewstep.kernels.fp8_gemm.fp8_gemm`.  Returns
    (M, N) ``out_dtype``."""
    _check_a16(a)
    n, k, g = _check_weight(packed, scales, zeros, a.shape[1], a.device)
    _check_common(bias, activation, out_dtype, n, a.device)
    tokens = _check_gated(residual, gate, a.shape[0], n, a.device)
    check_launch(a.device, "int4_gemm")
    return _launch(
        a,
        None,
        packed,
        scales,
        zeros,
        bias,
        activation,
        out_dtype,
        config,
        out,
        residual,
        gate,
        w4a8=False,
        n=n,
        k=k,
        g=g,
        tokens=tokens,
    )


def w4a8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Fp8GemmConfig | None = None,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A8: ``act((a * a_scale) @ W.T + bias)``, INT4 weights expanded to E4M3 in the kernel (Triton).

    a: (M, K) float8_e4m3fn, a_scale: (M, 1) per token or (1,) fp32 (from ``quantize_fp8``).  Needs FP8
    tensor cores (sm_89+) on CUDA; anything else as :func:`int4_gemm`."""
    _check_a8(a, a_scale)
    n, k, g = _check_weight(packed, scales, zeros, a.shape[1], a.device)
    _check_common(bias, activation, out_dtype, n, a.device)
    tokens = _check_gated(residual, gate, a.shape[0], n, a.device)
    check_launch(a.device, "w4a8_gemm")
    if a.device.type == "cuda" and not has_fp8_tensor_cores(a.device):
        raise RuntimeError(
            f"w4a8_gemm needs FP8 tensor cores (sm_89+); {torch.cuda.get_device_name(a.device)} has compute "
            f"capability {torch.cuda.get_device_capability(a.device)}: use int4_gemm (quant='int4') or "
            f"w4a8_gemm_ref"
        )
    return _launch(
        a,
        a_scale,
        packed,
        scales,
        zeros,
        bias,
        activation,
        out_dtype,
        config,
        out,
        residual,
        gate,
        w4a8=True,
        n=n,
        k=k,
        g=g,
        tokens=tokens,
    )


def _epilogue_ref(acc, bias, activation, residual, gate, tokens, out_dtype, out):
    n = acc.shape[1]
    if bias is not None:
        acc = acc + bias.float().reshape(1, n)
    if activation is not None:
        acc = torch.nn.functional.gelu(acc, approximate="tanh" if activation == "gelu_tanh" else "none")
    if residual is not None:
        acc = residual.float() + gate.float().repeat_interleave(tokens, dim=0) * acc
    res = acc.to(out_dtype)
    if out is not None:
        out.copy_(res)
        return out
    return res


def int4_gemm_ref(
    a: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Fp8GemmConfig | None = None,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch :func:`int4_gemm`: W dequantized in fp32 and rounded to a's dtype (as the kernel's MMA
    operand is), fp32 matmul and epilogue (``config`` is accepted and ignored)."""
    _check_a16(a)
    n, _, _ = _check_weight(packed, scales, zeros, a.shape[1], a.device)
    _check_common(bias, activation, out_dtype, n, a.device)
    tokens = _check_gated(residual, gate, a.shape[0], n, a.device)
    w = dequantize_int4_ref(packed, scales, zeros).to(a.dtype).float()
    return _epilogue_ref(a.float() @ w.t(), bias, activation, residual, gate, tokens, out_dtype, out)


def w4a8_gemm_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Fp8GemmConfig | None = None,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch :func:`w4a8_gemm`: E4M3 activations widened to fp32 against the fp32 dequantized
    weight, the per-token scale, then the epilogue (``config`` is accepted and ignored)."""
    _check_a8(a, a_scale)
    n, _, _ = _check_weight(packed, scales, zeros, a.shape[1], a.device)
    _check_common(bias, activation, out_dtype, n, a.device)
    tokens = _check_gated(residual, gate, a.shape[0], n, a.device)
    acc = (a.float() @ dequantize_int4_ref(packed, scales, zeros).t()) * a_scale.float().reshape(-1, 1)
    return _epilogue_ref(acc, bias, activation, residual, gate, tokens, out_dtype, out)
