"""FP8 (E4M3) x FP8 GEMM with fp32 accumulation and a fused epilogue: scales, bias, GELU (tanh), bf16 out.

``out = act((a @ w.T) * a_scale * w_scale + bias)`` for ``a: (M, K)`` activations quantized per token
(``a_scale:
(M, 1)``) or per tensor (``(1,)``, static), ``w: (N, K)`` weights quantized per output channel (``w_scale:
(N,)``), the layout of ``nn.Linear.weight``, so both operands are K-major as FP8 tensor cores want them.

Two kernels share the epilogue:

* ``_fp8_gemm_kernel``: a plain tiled GEMM (one program per output tile, grouped ordering for L2 reuse),
  pointer loads with masks.  Any CUDA GPU with FP8 (sm_89+), and the interpreter on CPU.
* ``_fp8_gemm_persistent_kernel`` (Hopper, sm_90+, when the installed Triton has host tensor descriptors):
  one program per SM looping over output tiles, operands loaded by TMA through ``TensorDescriptor``s.

Launch configs are data (:data:`FP8_GEMM_CONFIGS`), picked per ``(M, N, K)`` by :func:`resolve_config`,
either by a size heuristic or by timing the candidates on the GPU (``tune=True``), once, when a plan is built;
the plan records the choice so a cold start does not tune again.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch

from .triton_support import check_launch, interpreting, tl, triton

__all__ = [
    "fp8_gemm",
    "fp8_gemm_ref",
    "Fp8GemmConfig",
    "FP8_GEMM_CONFIGS",
    "INTERPRETER_CONFIG",
    "resolve_config",
    "heuristic_config",
    "candidate_configs",
    "has_fp8_tensor_cores",
    "has_tma",
    "ACTIVATIONS",
    "EPILOGUES",
    "epilogue_of",
]

ACTIVATIONS = (None, "gelu_tanh", "gelu")
# what a GEMM's epilogue fuses after the scales; launch configs are resolved (and tuned) per epilogue, since a
# fused epilogue changes the register pressure of a tile (see heuristic_config)
EPILOGUES = ("plain", "bias", "bias_gelu", "gated")

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - no triton, or an older one: the tiled kernel only
    TensorDescriptor = None


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    persistent: bool = False  # the Hopper TMA kernel (falls back to the tiled one where it cannot run)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def smem_bytes(self) -> int:
        """Estimated shared memory of the software pipeline: one A and one W tile (1 byte each) per stage."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k


# Candidates for FP8 tensor-core GPUs (H100 / L40S / RTX 40xx).  NOT YET MEASURED: sizes follow Triton's
# persistent-matmul tutorial and torchao's FP8 configs (BLOCK_K = 128: one 128-byte FP8 row per K step);
# `resolve_config(tune=True)` times them on the device and the plan records the winner.
FP8_GEMM_CONFIGS: tuple[Fp8GemmConfig, ...] = (
    Fp8GemmConfig(128, 256, 128, 8, num_warps=8, num_stages=3, persistent=True),
    Fp8GemmConfig(128, 128, 128, 8, num_warps=8, num_stages=4, persistent=True),
    Fp8GemmConfig(128, 128, 128, 8, num_warps=4, num_stages=4),
    Fp8GemmConfig(128, 256, 128, 8, num_warps=8, num_stages=3),
    Fp8GemmConfig(64, 128, 128, 8, num_warps=4, num_stages=4),
    Fp8GemmConfig(64, 256, 128, 8, num_warps=4, num_stages=4),
    Fp8GemmConfig(128, 64, 128, 8, num_warps=4, num_stages=4),
    Fp8GemmConfig(64, 64, 128, 8, num_warps=4, num_stages=5),
    # fit Ada's ~100 KB of shared memory per block (sm_89: no TMA, smaller SMEM)
    Fp8GemmConfig(128, 128, 64, 8, num_warps=4, num_stages=3),
    Fp8GemmConfig(64, 128, 64, 8, num_warps=4, num_stages=4),
)
# Large-M preference (indices into FP8_GEMM_CONFIGS) per epilogue.  Evidence: every config compiled ahead of
# time for sm_90 by Triton 3.9 (bf16 out, per-token scales; `cuobjdump -res-usage`), registers / spilled stack
# bytes per thread, plain | bias + GELU | gated residual:
#  persistent 128x256 8 warps 186/0 | 255/1496 | 255/5096; persistent 128x128 8 warps 142/0 | 186/0 | 255/1200
#  persistent 128x128 4 warps 212/0 | 255/1424 | 255/5152; tiled 128x256 8 warps 194/0 | 255/0 | 255/952
#  tiled 128x128 4 warps 190/0 | 255/0 | 255/1904; tiled 64x256 4 warps 200/0 | 255/0 | 255/1208
#  tiled 64x128 4 warps  118/0 | 127/0 | 255/144
# So GELU takes the persistent 128x128 tile and the gated residual the tiled 64x128 one (the least spill: the
# residual and gate tiles are loaded in the epilogue); tests/kernels/test_fp8_aot.py re-checks these bounds.
# Triton 3.6 (the same check): persistent 128x256 spills 984 B even plain; persistent 128x128 159/0 | 189/0 |
# 255/1208; tiled 64x128 118/0 | 126/0 | 255/112: below Triton 3.9 plain and bias take the 128x128 tile too.
_LARGE_M_ORDER = {
    "plain": (0, 2, 8, 4),
    "bias": (0, 2, 8, 4),
    "bias_gelu": (1, 2, 8, 4),
    "gated": (4, 9, 8),
}
# Under the interpreter every program is a numpy loop: small tiles keep the tests quick.
INTERPRETER_CONFIG = Fp8GemmConfig(32, 32, 32, 2, num_warps=4, num_stages=1)

_TUNED: dict[tuple, Fp8GemmConfig] = {}

if triton is not None:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    # what a candidate config that cannot run on this GPU raises; anything else (a CUDA error, a bad argument)
    # is a real failure and must not be skipped: a CUDA error left pending breaks every later call
    _CONFIG_DOES_NOT_FIT: tuple[type[BaseException], ...] = (OutOfResources, CompilationError)
else:  # pragma: no cover
    _CONFIG_DOES_NOT_FIT = ()


def epilogue_of(activation: str | None, bias: bool, gated: bool) -> str:
    """The :data:`EPILOGUES` name of a GEMM with this activation, bias and gated residual."""
    if gated:
        return "gated"
    if activation is not None:
        return "bias_gelu"  # GELU with or without bias: the same register pressure
    return "bias" if bias else "plain"


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def _smem_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _cuda(device) -> torch.device | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def has_fp8_tensor_cores(device: torch.device | str) -> bool:
    """sm_89 (Ada) or newer: the E4M3 tensor-core MMA that Triton's ``tl.dot`` on float8e4nv lowers to."""
    dev = _cuda(device)
    return dev is not None and _capability(dev) >= (8, 9)


def has_tma(device: torch.device | str) -> bool:
    dev = _cuda(device)
    return TensorDescriptor is not None and dev is not None and _capability(dev) >= (9, 0)


def candidate_configs(device: torch.device | str) -> tuple[Fp8GemmConfig, ...]:
    """The configs of :data:`FP8_GEMM_CONFIGS` that can run on ``device`` (TMA, shared memory)."""
    dev = _cuda(device)
    if dev is None:
        return (INTERPRETER_CONFIG,)
    tma, limit = has_tma(dev), _smem_limit(dev)
    return tuple(c for c in FP8_GEMM_CONFIGS if (tma or not c.persistent) and c.smem_bytes <= limit)


def heuristic_config(m: int, n: int, k: int, device: torch.device | str | None = None, *,
                     epilogue: str = "plain") -> Fp8GemmConfig:
    """A size heuristic over :data:`FP8_GEMM_CONFIGS` (unmeasured; ``resolve_config(tune=True)`` measures).

    Prefers, by M: small tiles (M <= 64), 64-row tiles (M <= 512), the persistent 128 x 256 tile (plain and
    bias epilogues) or a tile that does not spill registers with the fused epilogue (GELU, gated residual);
    the first preference that fits ``device`` (any, when None)."""
    _check_epilogue(epilogue)
    if m <= 64:
        order = (7, 9, 4)
    elif m <= 512:
        order = (4, 9, 8)
    else:
        order = _LARGE_M_ORDER[epilogue]
        if order[0] == 0 and _triton_version() < (3, 9):
            order = _LARGE_M_ORDER["bias_gelu"]
    fits = candidate_configs(device) if device is not None else FP8_GEMM_CONFIGS
    for i in order:
        if FP8_GEMM_CONFIGS[i] in fits:
            return FP8_GEMM_CONFIGS[i]
    return fits[0] if fits else FP8_GEMM_CONFIGS[-1]


def resolve_config(
    m: int, n: int, k: int, device: torch.device | str, *, tune: bool = False, epilogue: str = "plain"
) -> Fp8GemmConfig:
    """The launch config for an (M, N, K) GEMM with ``epilogue`` (:data:`EPILOGUES`) on ``device``: timed over
    the candidates with that epilogue when ``tune`` (CUDA, cached per shape, epilogue and GPU), else
    :func:`heuristic_config`; the interpreter's small tiles on CPU."""
    _check_epilogue(epilogue)
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    if not tune:
        return heuristic_config(m, n, k, device, epilogue=epilogue)
    key = (m, n, k, epilogue, torch.cuda.get_device_name(device))
    if key not in _TUNED:
        _TUNED[key] = _tune(m, n, k, device, epilogue)
    return _TUNED[key]


@functools.cache
def _triton_version() -> tuple[int, int]:
    from .quantize_fp8 import triton_version

    return triton_version()


def _check_epilogue(epilogue: str) -> None:
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")


def _tune(m, n, k, device, epilogue: str = "plain") -> Fp8GemmConfig:
    from triton.testing import do_bench

    a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
    w = torch.randn(n, k, device=device).to(torch.float8_e4m3fn)
    sa = torch.rand(m, 1, device=device) + 0.5
    sw = torch.rand(n, device=device) + 0.5
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    extra: dict = {}
    if epilogue != "plain":
        extra["bias"] = torch.randn(n, device=device, dtype=torch.bfloat16)
    if epilogue == "bias_gelu":
        extra["activation"] = "gelu_tanh"
    if epilogue == "gated":
        batch = math.gcd(m, 16)
        extra["residual"] = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        extra["gate"] = torch.randn(batch, n, device=device, dtype=torch.bfloat16)
    best, best_ms = None, math.inf
    for cfg in candidate_configs(device):
        try:
            ms = do_bench(lambda c=cfg: fp8_gemm(a, sa, w, sw, config=c, out=out, **extra), warmup=5, rep=20)
        except _CONFIG_DOES_NOT_FIT:  # too much shared memory or registers for this GPU: not a candidate
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no FP8 GEMM config ran for (M, N, K) = {(m, n, k)} on {device}")
    return best


if triton is not None:

    @triton.jit
    def _epilogue_store(
        acc, offs_m, offs_n, out_ptr, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, gate_ptr, tokens,
        gate_stride, ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
        GATED_RES: tl.constexpr,
    ):
        """Scales, bias, GELU and the gated residual on an fp32 output tile, then its masked store."""
        mask_m = offs_m < M
        mask_n = offs_n < N
        if ROW_SCALE:
            sa = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
            acc = acc * sa[:, None]
        else:
            acc = acc * tl.load(a_scale_ptr)
        acc = acc * tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GELU == 1:  # tanh form: 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
            u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(tl.minimum(tl.maximum(2.0 * u, -80.0), 80.0))  # clamp: exp() stays finite
        elif GELU == 2:  # exact: 0.5 x (1 + erf(x / sqrt(2)))
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        mask = mask_m[:, None] & mask_n[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        if GATED_RES:  # adaLN-Zero residual: out = residual + gate[batch] * y
            g = tl.load(gate_ptr + (rows // tokens) * gate_stride + offs_n[None, :], mask=mask, other=0.0)
            r = tl.load(res_ptr + rows * N + offs_n[None, :], mask=mask, other=0.0)
            acc = r.to(tl.float32) + g.to(tl.float32) * acc
        tl.store(out_ptr + rows * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # grouped ordering: GROUP_M row-tiles share each column of W while it is in L2
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, gate_ptr, tokens, gate_stride,
        M, N, K,
        ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, GATED_RES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of W^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=(offs_n[None, :] < N) & k_ok[:, None], other=0.0)
            acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        _epilogue_store(acc, offs_m, offs_n, out_ptr, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr,
                        gate_ptr, tokens, gate_stride, ROW_SCALE, HAS_BIAS, GELU, GATED_RES)

    @triton.jit
    def _fp8_gemm_persistent_kernel(
        a_desc, w_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, gate_ptr, tokens, gate_stride,
        M, N, K, NUM_PROGRAMS,
        ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, GATED_RES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
            pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):  # TMA zero-fills out-of-bounds rows and columns
                a = a_desc.load([pid_m * BLOCK_M, k0])
                w = w_desc.load([pid_n * BLOCK_N, k0])
                acc = tl.dot(a, w.T, acc)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            _epilogue_store(acc, offs_m, offs_n, out_ptr, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr,
                            gate_ptr, tokens, gate_stride, ROW_SCALE, HAS_BIAS, GELU, GATED_RES)


def _check(a, a_scale, w, w_scale, bias, activation, out_dtype):
    for name, t in (("a", a), ("w", w)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.float8_e4m3fn:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 2-d float8_e4m3fn tensor, got {got}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    (m, k), (n, kw) = a.shape, w.shape
    if k != kw:
        raise ValueError(f"a is (M, K) = {tuple(a.shape)} but w is (N, K) = {tuple(w.shape)}: K differs")
    if k % 16 or n % 16:
        raise ValueError(
            f"fp8_gemm needs K and N multiples of 16 (FP8 MMA and 16-byte rows), got K={k}, N={n}"
        )
    if (
        not isinstance(a_scale, torch.Tensor)
        or a_scale.dtype != torch.float32
        or a_scale.numel() not in (1, m)
    ):
        raise ValueError(f"a_scale: expected float32 with {m} (per token) or 1 (per tensor) elements")
    if not a_scale.is_contiguous() or not w_scale.is_contiguous():
        raise ValueError("a_scale and w_scale must be contiguous")
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32 or w_scale.numel() != n:
        raise ValueError(f"w_scale: expected float32 with {n} elements (per output channel)")
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.numel() != n or not bias.is_floating_point()
    ):
        raise ValueError(f"bias: expected a floating-point tensor with {n} elements")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    for name, t in (("a_scale", a_scale), ("w", w), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name}: expected device {a.device}, got {t.device}")
    return m, n, k


def _check_gated(residual, gate, m, n, device) -> int:
    """Validate the gated-residual epilogue's inputs; returns tokens per batch item (1 when unused)."""
    if residual is None and gate is None:
        return 1
    if residual is None or gate is None:
        raise ValueError("residual and gate go together (out = residual + gate[row // tokens] * y)")
    if residual.shape != (m, n) or not residual.is_contiguous() or not residual.is_floating_point():
        raise ValueError(f"residual: expected a contiguous floating-point ({m}, {n}) tensor")
    if gate.dim() != 2 or gate.shape[1] != n or gate.stride(1) != 1 or m % gate.shape[0]:
        raise ValueError(
            f"gate: expected (batch, {n}) with a contiguous last dimension and {m} rows a multiple "
            f"of batch, got {tuple(gate.shape)}"
        )
    if residual.device != device or gate.device != device:
        raise ValueError(f"residual and gate must be on {device}")
    return m // gate.shape[0]


def fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None = None, *, activation: str | None = None,
    out_dtype: torch.dtype = torch.bfloat16, config: Fp8GemmConfig | None = None,
    out: torch.Tensor | None = None, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act((a @ w.T) * a_scale * w_scale + bias)`` with the Triton FP8 kernels.

    a: (M, K) float8_e4m3fn, contiguous.  a_scale: (M, 1) fp32 per token or (1,) per tensor.  w: (N, K)
    float8_e4m3fn, contiguous.  w_scale: (N,) fp32.  bias: (N,) any float dtype or None.  activation: None,
    "gelu_tanh" or "gelu" (erf).  K and N multiples of 16.  Returns (M, N) ``out_dtype`` (written into ``out``
    if given).  config: a launch config (default: :func:`resolve_config`'s heuristic).  residual: (M, N),
    contiguous, and gate: (B, N) with a contiguous last dimension, M = B x tokens: returns
    ``residual + gate[row // tokens] * y`` instead (the adaLN-Zero residual of a DiT block, in the epilogue).
    """
    m, n, k = _check(a, a_scale, w, w_scale, bias, activation, out_dtype)
    tokens = _check_gated(residual, gate, m, n, a.device)
    check_launch(a.device, "fp8_gemm")
    if a.device.type == "cuda" and not has_fp8_tensor_cores(a.device):
        raise RuntimeError(
            f"fp8_gemm needs FP8 tensor cores (sm_89+); {torch.cuda.get_device_name(a.device)} "
            f"has compute capability {torch.cuda.get_device_capability(a.device)}: use "
            f"fp8_gemm_ref (quant='fp8-emulated')"
        )
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous() or out.device != a.device:
        raise ValueError(f"out: expected a contiguous ({m}, {n}) {out_dtype} tensor on {a.device}")
    if m == 0:
        return out
    cfg = config or resolve_config(m, n, k, a.device, epilogue=epilogue_of(activation, bias is not None,
                                                                         residual is not None))
    flags = dict(
        ROW_SCALE=a_scale.numel() > 1,
        HAS_BIAS=bias is not None,
        GELU=ACTIVATIONS.index(activation),
        GATED_RES=residual is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
    )
    # pointers a launch does not use are never dereferenced
    bias_arg = bias if bias is not None else w_scale
    res_arg, gate_arg = (residual, gate) if residual is not None else (w_scale, w_scale)
    gated = (res_arg, gate_arg, tokens, gate.stride(0) if gate is not None else 0)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if cfg.persistent and (has_tma(a.device) or (interpreting() and TensorDescriptor is not None)):
        a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k])
        programs = min(tiles, _num_sms(a.device))
        _fp8_gemm_persistent_kernel[(programs,)](
            a_desc,
            w_desc,
            out,
            a_scale,
            w_scale,
            bias_arg,
            *gated,
            m,
            n,
            k,
            programs,
            **flags,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    else:
        _fp8_gemm_kernel[(tiles,)](
            a,
            w,
            out,
            a_scale,
            w_scale,
            bias_arg,
            *gated,
            m,
            n,
            k,
            **flags,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each looping over several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def fp8_gemm_ref(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None = None, *, activation: str | None = None,
    out_dtype: torch.dtype = torch.bfloat16, config: Fp8GemmConfig | None = None,
    out: torch.Tensor | None = None, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch :func:`fp8_gemm`: the FP8 operands widened to fp32, fp32 matmul and epilogue (``config``
    is accepted and ignored)."""
    m, n, _ = _check(a, a_scale, w, w_scale, bias, activation, out_dtype)
    tokens = _check_gated(residual, gate, m, n, a.device)
    acc = a.float() @ w.float().t()
    acc = acc * a_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, n)
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
