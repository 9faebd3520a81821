"""INT4 speed on the GPU (``fewstep bench --quant int4|w4a8``, ``benchmarks/test_int4.py``, gpu-check).

1. W4A16: :func:`~fewstep.kernels.int4_gemm.int4_gemm` vs cuBLAS bf16 (``F.linear`` on the unquantized bf16
   weight) on DiT-XL/2 and Flux layer shapes, M from 1 (a batch-1 projection) to 4096.
   Targets (issue 13): >= 1.5x at M <= 64, >= 0.9x at M >= 2048.
2. W4A8: :func:`~fewstep.kernels.int4_gemm.w4a8_gemm` vs fewstep's FP8 W8A8
   :func:`~fewstep.kernels.fp8_gemm.fp8_gemm` (launch config tuned on the device, as ``quantize(tune=True)``
   runs it) on the same E4M3 activations, M >= 4096.  Target: >= 0.9x.
3. DiT-XL/2 forward at batch 16 replayed from a CUDA graph (the FP8 forward benchmark's setup,
   :func:`fewstep.bench.fp8.bench_dit_forward`): ``quant="w4a8"`` vs ``quant="fp8"`` (and bf16).  Target: the
   W4A8 forward within 10% of the FP8 forward.

Every function checks what it timed before it returns: outputs finite, each GEMM against its plain-PyTorch
``_ref`` on the same operands at :data:`GEMM_SQNR_FLOOR_DB`, each quantized forward against the unquantized
one no more than :data:`FORWARD_SQNR_MARGIN_DB` worse than the same quantization emulated with PyTorch ops;
a failed check is a RuntimeError, never a row.  Timings come from :mod:`fewstep.bench.timing` (medians; a
plain timer in the CPU dry run, where the Triton kernels run under the interpreter).  NOT YET MEASURED on a
GPU.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fp8 import DIT_XL_2_GEMMS, dit_forward
from .models import DIT_TINY, DIT_XL_2
from .sample import build_dit
from .timing import graph_median_ms, median_ms

__all__ = [
    "FLUX_GEMMS",
    "INT4_GEMM_M",
    "W4A8_GEMM_M",
    "GEMM_SQNR_FLOOR_DB",
    "FORWARD_SQNR_MARGIN_DB",
    "DIT_INT4_TINY",
    "Int4GemmResult",
    "W4a8GemmResult",
    "Int4ForwardResult",
    "gemm_shapes",
    "KERNEL_CASES",
    "KernelCheck",
    "check_int4_kernels",
    "bench_int4_gemm",
    "bench_w4a8_gemm",
    "bench_int4_dit_forward",
    "format_int4_table",
]

# Flux (3072 hidden): attention q/k/v/out (3072, 3072), MLP in (12288, 3072), MLP out (3072, 12288), fused
# q/k/v (9216, 3072); as (N, K)
FLUX_GEMMS = ((3072, 3072), (12288, 3072), (3072, 12288), (9216, 3072))
# M = 1 .. 64: batch-1 / small-token projections (memory-bound); 2048 .. 4096: DiT-XL/2 at batch 8 .. 16
INT4_GEMM_M = (1, 16, 64, 2048, 4096)
W4A8_GEMM_M = (4096, 8192)
# Kernel vs its _ref on the same operands: the two differ by the fp32 summation order, which flips the bf16
# rounding of some outputs: 45-48 dB measured under the interpreter (check_int4_kernels' cases and the dry-run
# shapes); 40 dB leaves room for the FP8 MMA's reduced-precision accumulation on a GPU (W4A8) and fails on any
# wrong tile, group scale or nibble order (those land near 0 dB).
GEMM_SQNR_FLOOR_DB = 40.0
# A Triton forward may lose at most this much SQNR (against the unquantized forward) relative to the same
# quantization emulated with PyTorch ops: 1 dB is kernel noise up to 26% of the quantization noise, while a
# wrong kernel loses tens of dB.  Not yet measured on a GPU.
FORWARD_SQNR_MARGIN_DB = 1.0
# DIT_TINY with 32-wide projections, so INT4 group 32 divides every K (the dry run's forward)
DIT_INT4_TINY = dict(DIT_TINY, attention_head_dim=16)


def gemm_shapes() -> tuple[tuple[str, int, int], ...]:
    """``(model, N, K)`` of every layer shape the INT4 GEMM benchmarks time: DiT-XL/2, then Flux."""
    return tuple(("DiT-XL/2", n, k) for n, k in DIT_XL_2_GEMMS) + tuple(("Flux", n, k) for n, k in FLUX_GEMMS)


@dataclass(frozen=True)
class Int4GemmResult:
    """W4A16 ``int4_gemm`` vs cuBLAS bf16 on one (M, N, K)."""

    device: str
    model: str
    m: int
    n: int
    k: int
    group_size: int
    int4_us: float  # median, the launch config INT4Linear picks (int4_config)
    bf16_us: float  # F.linear in bf16 on the unquantized weight
    config: str
    sqnr_vs_ref_db: float  # int4_gemm vs int4_gemm_ref on the same operands (checked)
    sqnr_vs_bf16_db: float  # vs the unquantized bf16 GEMM: the 4-bit weights' error (recorded)
    best_us: float | None = None  # the fastest of INT4_GEMM_CONFIGS["w4a16"] (CUDA only): evidence for tuning
    best_config: str | None = None

    @property
    def speedup(self) -> float:
        """bf16 time / INT4 time."""
        return self.bf16_us / self.int4_us

    @property
    def target(self) -> float | None:
        """Issue 13: >= 1.5x at M <= 64, >= 0.9x at M >= 2048, none between."""
        return 1.5 if self.m <= 64 else 0.9 if self.m >= 2048 else None

    @property
    def weight_gbps(self) -> float:
        """Packed weights + scales read per second (GB/s): the bound at small M."""
        return (self.n * self.k // 2 + self.n * (self.k // self.group_size) * 2) / self.int4_us / 1e3


@dataclass(frozen=True)
class W4a8GemmResult:
    """W4A8 ``w4a8_gemm`` vs fewstep's FP8 ``fp8_gemm`` on the same E4M3 activations."""

    device: str
    model: str
    m: int
    n: int
    k: int
    group_size: int
    w4a8_us: float  # median, the config INT4Linear picks (int4_config)
    fp8_us: float  # median, fp8_gemm with its tuned config (heuristic when not tuned)
    config: str
    fp8_config: str
    sqnr_vs_ref_db: float  # w4a8_gemm vs w4a8_gemm_ref (checked)
    fp8_sqnr_vs_ref_db: float  # fp8_gemm vs fp8_gemm_ref (checked)
    sqnr_vs_bf16_db: float  # W4A8 vs the unquantized bf16 GEMM (recorded)
    best_us: float | None = None  # the fastest of INT4_GEMM_CONFIGS["w4a8"] (CUDA only)
    best_config: str | None = None

    @property
    def speedup(self) -> float:
        """FP8 time / W4A8 time (target >= 0.9)."""
        return self.fp8_us / self.w4a8_us

    @property
    def tflops(self) -> float:
        return 2 * self.m * self.n * self.k / self.w4a8_us / 1e6


@dataclass(frozen=True)
class Int4ForwardResult:
    """One DiT forward from a CUDA graph: bf16, FP8 and the INT4 mode, with each output checked."""

    device: str
    model: str
    batch: int
    mode: str  # "w4a8" or "int4" ("-emulated" on CPU without the interpreter)
    group_size: int
    bf16_ms: float
    fp8_ms: float
    int4_ms: float
    int4_sqnr_db: float  # the INT4 forward vs the unquantized one
    int4_emulated_sqnr_db: float  # the same quantization with PyTorch ops vs the unquantized one
    fp8_sqnr_db: float
    fp8_emulated_sqnr_db: float
    int4_vs_emulated_db: float  # the INT4 forward vs its emulation (recorded: the kernels' own deviation)
    fp8_vs_emulated_db: float

    @property
    def ratio(self) -> float:
        """INT4-mode forward time / FP8 forward time (target for w4a8: <= 1.1)."""
        return self.int4_ms / self.fp8_ms

    @property
    def speedup(self) -> float:
        """FP8 time / INT4-mode time."""
        return self.fp8_ms / self.int4_ms


def _sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """SQNR of ``approx`` against ``exact`` in dB; -inf when ``approx`` is not finite."""
    a, e = approx.double(), exact.double()
    if not torch.isfinite(a).all():
        return -math.inf
    noise = float((a - e).pow(2).mean())
    return math.inf if noise == 0 else 10 * math.log10(float(e.pow(2).mean()) / noise)


def _check(what: str, sqnr: float, floor: float) -> None:
    if not sqnr >= floor:  # NaN fails too
        raise RuntimeError(f"{what}: SQNR {sqnr:.1f} dB is below the floor {floor:.1f} dB")


def _device_name(device: torch.device) -> str:
    import platform

    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def _operands(m: int, n: int, k: int, device: torch.device):
    """Activations ``(m, k)`` and a weight ``(n, k)`` in bf16 (1/sqrt(k) scaled), the same for a shape."""
    g = torch.Generator(device="cpu").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device, torch.bfloat16)
    return x, w


def _config_sweep(kind: str, group_size: int, run, expect: torch.Tensor,
                  device: torch.device) -> tuple[float | None, str | None]:
    """``(microseconds, config)`` of the fastest of ``INT4_GEMM_CONFIGS[kind]`` (block_k cut to the group) for
    ``run(config)``, each config's output checked against ``expect`` first (>= :data:`GEMM_SQNR_FLOOR_DB`);
    configs that do not fit the GPU (shared memory, registers) are left out.  Evidence for the size heuristic
    of :func:`~fewstep.kernels.int4_gemm.int4_config`, which nothing tunes yet."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from ..kernels.fp8_gemm import Fp8GemmConfig
    from ..kernels.int4_gemm import INT4_GEMM_CONFIGS

    best, best_ms = None, math.inf
    for c in INT4_GEMM_CONFIGS[kind]:
        if c.block_k > group_size:
            c = Fp8GemmConfig(c.block_m, c.block_n, group_size, c.group_m, c.num_warps, c.num_stages)
        try:
            _check(f"{kind} config {c}", _sqnr_db(run(c), expect), GEMM_SQNR_FLOOR_DB)
        except (OutOfResources, CompilationError):
            continue
        ms = median_ms(lambda c=c: run(c), device, rep_ms=20.0)
        if ms < best_ms:
            best, best_ms = c, ms
    return (best_ms * 1e3, str(best)) if best is not None else (None, None)


# Awkward shapes the timed layer shapes do not reach (odd M, N not a multiple of the tile, zero points, every
# epilogue), as (kind, M, N, K, group, zero points, epilogue), checked on the device before anything is timed
KERNEL_CASES = (
    ("w4a16", 1, 48, 64, 32, False, "plain"),
    ("w4a16", 77, 144, 256, 64, True, "bias_gelu"),
    ("w4a16", 300, 80, 384, 128, False, "gated"),
    ("w4a8", 3, 48, 128, 64, True, "plain"),
    ("w4a8", 130, 96, 256, 128, False, "bias_gelu"),
    ("w4a8", 300, 80, 384, 128, True, "gated"),
)


@dataclass(frozen=True)
class KernelCheck:
    device: str
    kind: str
    m: int
    n: int
    k: int
    group_size: int
    zero_point: bool
    epilogue: str
    sqnr_vs_ref_db: float


def check_int4_kernels(device: torch.device, cases=KERNEL_CASES) -> list[KernelCheck]:
    """``int4_gemm`` / ``w4a8_gemm`` against their ``_ref`` on ``cases`` (bf16 activations and out, random
    weights quantized round-to-nearest; E4M3 per-token activations for W4A8): a RuntimeError below
    :data:`GEMM_SQNR_FLOOR_DB`.  W4A8 cases are left out on a GPU without FP8 tensor cores."""
    from ..kernels.fp8_gemm import has_fp8_tensor_cores
    from ..kernels.int4_gemm import int4_gemm, int4_gemm_ref, quantize_int4_ref, w4a8_gemm, w4a8_gemm_ref
    from ..kernels.quantize_fp8 import quantize_fp8_ref

    rows = []
    for kind, m, n, k, group, zero_point, epilogue in cases:
        if kind == "w4a8" and device.type == "cuda" and not has_fp8_tensor_cores(device):
            continue
        x, w = _operands(m, n, k, device)
        packed, scales, zeros = quantize_int4_ref(w, group, zero_point=zero_point, scale_dtype=torch.bfloat16)
        g = torch.Generator(device="cpu").manual_seed(m * n)
        kw: dict = {}
        if epilogue != "plain":
            kw["bias"] = torch.randn(n, generator=g).to(device, torch.bfloat16)
        if epilogue == "bias_gelu":
            kw["activation"] = "gelu_tanh"
        if epilogue == "gated":  # batch 3 of m / 3 tokens, the gate a chunk of a wider tensor (row stride 3n)
            kw["residual"] = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
            kw["gate"] = torch.randn(3, 3 * n, generator=g).to(device, torch.bfloat16)[:, n:2 * n]
        if kind == "w4a8":
            a, sa = quantize_fp8_ref(x)
            got = w4a8_gemm(a, sa, packed, scales, zeros, **kw)
            want = w4a8_gemm_ref(a, sa, packed, scales, zeros, **kw)
        else:
            got = int4_gemm(x, packed, scales, zeros, **kw)
            want = int4_gemm_ref(x, packed, scales, zeros, **kw)
        sqnr = _sqnr_db(got, want)
        _check(f"{kind} {m}x{n}x{k} group {group} zero points {zero_point} {epilogue} vs its _ref", sqnr,
               GEMM_SQNR_FLOOR_DB)
        rows.append(KernelCheck(_device_name(device), kind, m, n, k, group, zero_point, epilogue, sqnr))
    return rows


def bench_int4_gemm(m: int, n: int, k: int, device: torch.device, *, group_size: int = 128,
                    model: str = "", sweep: bool = True) -> Int4GemmResult:
    """W4A16 (symmetric, bf16 scales, round-to-nearest) vs ``F.linear`` in bf16; the output checked against
    :func:`~fewstep.kernels.int4_gemm.int4_gemm_ref` (>= :data:`GEMM_SQNR_FLOOR_DB`).  sweep: also time every
    candidate config (CUDA; each output checked)."""
    from ..kernels.int4_gemm import int4_config, int4_gemm, int4_gemm_ref, quantize_int4_ref

    x, w = _operands(m, n, k, device)
    packed, scales, _ = quantize_int4_ref(w, group_size, scale_dtype=torch.bfloat16)
    cfg = int4_config("w4a16", m, group_size, device)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    got = int4_gemm(x, packed, scales, config=cfg, out=out).clone()
    expect = int4_gemm_ref(x, packed, scales)
    sqnr = _sqnr_db(got, expect)
    _check(f"int4_gemm {m}x{n}x{k} vs int4_gemm_ref", sqnr, GEMM_SQNR_FLOOR_DB)
    vs_bf16 = _sqnr_db(got, F.linear(x, w))
    int4_ms = median_ms(lambda: int4_gemm(x, packed, scales, config=cfg, out=out), device)
    bf16_ms = median_ms(lambda: F.linear(x, w), device)
    best_us = best_cfg = None
    if sweep and device.type == "cuda":
        best_us, best_cfg = _config_sweep(
            "w4a16", group_size, lambda c: int4_gemm(x, packed, scales, config=c, out=out), expect, device)
    return Int4GemmResult(_device_name(device), model, m, n, k, group_size, int4_ms * 1e3, bf16_ms * 1e3,
                          str(cfg), sqnr, vs_bf16, best_us, best_cfg)


def bench_w4a8_gemm(m: int, n: int, k: int, device: torch.device, *, group_size: int = 128, model: str = "",
                    fp8_tune: bool = True, sweep: bool = True) -> W4a8GemmResult:
    """W4A8 vs the FP8 W8A8 GEMM on the same per-token E4M3 activations (bf16 out, no epilogue); each output
    checked against its ``_ref`` (>= :data:`GEMM_SQNR_FLOOR_DB`).  fp8_tune: time the FP8 GEMM's candidate
    configs first (CUDA), as ``quantize(..., tune=True)`` does."""
    from ..kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, resolve_config
    from ..kernels.int4_gemm import int4_config, quantize_int4_ref, w4a8_gemm, w4a8_gemm_ref
    from ..kernels.quantize_fp8 import quantize_fp8_ref

    x, w = _operands(m, n, k, device)
    a, sa = quantize_fp8_ref(x)
    packed, scales, _ = quantize_int4_ref(w, group_size, scale_dtype=torch.bfloat16)
    wq, sw = quantize_fp8_ref(w)
    sw = sw.reshape(-1).contiguous()
    cfg = int4_config("w4a8", m, group_size, device)
    fp8_cfg = resolve_config(m, n, k, device, tune=fp8_tune and device.type == "cuda")
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    out8 = torch.empty_like(out)
    got = w4a8_gemm(a, sa, packed, scales, config=cfg, out=out).clone()
    expect = w4a8_gemm_ref(a, sa, packed, scales)
    sqnr = _sqnr_db(got, expect)
    _check(f"w4a8_gemm {m}x{n}x{k} vs w4a8_gemm_ref", sqnr, GEMM_SQNR_FLOOR_DB)
    fp8_sqnr = _sqnr_db(fp8_gemm(a, sa, wq, sw, config=fp8_cfg, out=out8), fp8_gemm_ref(a, sa, wq, sw))
    _check(f"fp8_gemm {m}x{n}x{k} vs fp8_gemm_ref", fp8_sqnr, GEMM_SQNR_FLOOR_DB)
    vs_bf16 = _sqnr_db(got, F.linear(x, w))
    w4a8_ms = median_ms(lambda: w4a8_gemm(a, sa, packed, scales, config=cfg, out=out), device)
    fp8_ms = median_ms(lambda: fp8_gemm(a, sa, wq, sw, config=fp8_cfg, out=out8), device)
    best_us = best_cfg = None
    if sweep and device.type == "cuda":
        best_us, best_cfg = _config_sweep(
            "w4a8", group_size, lambda c: w4a8_gemm(a, sa, packed, scales, config=c, out=out), expect, device)
    return W4a8GemmResult(_device_name(device), model, m, n, k, group_size, w4a8_ms * 1e3, fp8_ms * 1e3,
                          str(cfg), str(fp8_cfg), sqnr, fp8_sqnr, vs_bf16, best_us, best_cfg)


def bench_int4_dit_forward(batch: int, device: torch.device, *, mode: str = "w4a8",
                           config: dict | None = None, group_size: int = 128,
                           kernels: bool | None = None) -> Int4ForwardResult:
    """One DiT forward (DiT-XL/2 by default, random weights, class labels, t = 500) from a CUDA graph: bf16
    vs ``quant="fp8"`` (configs tuned, as :func:`fewstep.bench.fp8.bench_dit_forward`) vs ``quant=mode``
    ("w4a8" or "int4"; round-to-nearest, ``group_size``).  Each quantized output is checked against the
    unquantized forward: finite, and at most :data:`FORWARD_SQNR_MARGIN_DB` below its emulated twin.
    kernels: run the Triton modes (default: on CUDA, or on CPU under the interpreter); False times their
    emulations instead (the CPU dry run: the interpreter takes seconds per forward)."""
    from ..kernels.triton_support import interpreting
    from ..quant import quantize

    if mode not in ("w4a8", "int4"):
        raise ValueError(f"mode must be 'w4a8' or 'int4', got {mode!r}")
    config = config or DIT_XL_2
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    triton_ok = (cuda or interpreting()) if kernels is None else kernels
    forward = dit_forward(config, batch, device, dtype)

    def quantized(dit, q_mode, **kw):
        q = copy.deepcopy(dit)  # quantized in place: the cached model stays unquantized
        quantize(q, q_mode, **kw)
        return q

    sqnr, ms = {}, {}
    with torch.no_grad():
        dit = build_dit(config, device, dtype)
        ref = forward(dit)()
        ms["bf16"] = graph_median_ms(forward(dit), device)
        int4_kw = dict(group_size=group_size)
        for name, q_mode, kw in ((mode, mode, int4_kw), ("fp8", "fp8", dict(tune=cuda))):
            emulated = quantized(dit, f"{q_mode}-emulated", **kw)
            y_emulated = forward(emulated)()
            sqnr[f"{name}-emulated"] = _sqnr_db(y_emulated, ref)
            del emulated
            q = quantized(dit, q_mode if triton_ok else f"{q_mode}-emulated", **kw)
            y_q = forward(q)()
            sqnr[name] = _sqnr_db(y_q, ref)
            sqnr[f"{name}-vs-emulated"] = _sqnr_db(y_q, y_emulated)
            del y_q, y_emulated
            emulated_db = sqnr[f"{name}-emulated"]
            _check(f"DiT forward quant={q_mode!r} vs unquantized (emulated: {emulated_db:.1f} dB)",
                   sqnr[name], emulated_db - FORWARD_SQNR_MARGIN_DB)
            ms[name] = graph_median_ms(forward(q), device)
            del q
    shown = mode if triton_ok else f"{mode}-emulated"
    name = "DiT-XL/2" if config is DIT_XL_2 else "DiT (scaled)"
    return Int4ForwardResult(_device_name(device), name, batch, shown, group_size, ms["bf16"], ms["fp8"],
                             ms[mode], sqnr[mode], sqnr[f"{mode}-emulated"], sqnr["fp8"],
                             sqnr["fp8-emulated"], sqnr[f"{mode}-vs-emulated"], sqnr["fp8-vs-emulated"])


def _x(v: float | None, width: int = 7) -> str:
    return f"{v:{width - 1}.2f}x" if v is not None else f"{'-':>{width}s}"


def _us(v: float | None, width: int = 8) -> str:
    return f"{v:{width}.1f}" if v is not None else f"{'-':>{width}s}"


def format_int4_table(int4_gemms=(), w4a8_gemms=(), forwards=()) -> str:
    lines = []
    if int4_gemms:
        lines.append(f"{'w4a16 gemm':9s} {'M x N x K':20s} {'int4 us':>9s} {'bf16 us':>9s} {'vs bf16':>8s} "
                     f"{'target':>7s} {'GB/s':>7s} {'vs ref dB':>9s} {'vs bf16 dB':>10s} {'best us':>8s}"
                     "  config")
        for r in int4_gemms:
            lines.append(f"{r.model:9s} {f'{r.m} x {r.n} x {r.k}':20s} {r.int4_us:9.1f} {r.bf16_us:9.1f} "
                         f"{_x(r.speedup, 8)} {_x(r.target)} {r.weight_gbps:7.1f} {r.sqnr_vs_ref_db:9.1f} "
                         f"{r.sqnr_vs_bf16_db:10.1f} {_us(r.best_us)}  {r.config}")
    if w4a8_gemms:
        lines.append(f"{'w4a8 gemm':9s} {'M x N x K':20s} {'w4a8 us':>9s} {'fp8 us':>9s} {'vs fp8':>8s} "
                     f"{'TFLOP/s':>8s} {'vs ref dB':>9s} {'vs bf16 dB':>10s} {'best us':>8s}"
                     "  config | fp8 config")
        for r in w4a8_gemms:
            lines.append(f"{r.model:9s} {f'{r.m} x {r.n} x {r.k}':20s} {r.w4a8_us:9.1f} {r.fp8_us:9.1f} "
                         f"{_x(r.speedup, 8)} {r.tflops:8.1f} {r.sqnr_vs_ref_db:9.1f} "
                         f"{r.sqnr_vs_bf16_db:10.1f} {_us(r.best_us)}  {r.config} | {r.fp8_config}")
    if forwards:
        lines.append(f"{'INT4 DiT forward':30s} {'bf16 ms':>8s} {'fp8 ms':>8s} {'int4 ms':>8s} "
                     f"{'int4/fp8':>9s} {'int4 dB':>8s} {'emulated dB':>12s} {'fp8 dB':>7s} "
                     f"{'int4 vs emulated dB':>20s}")
        for r in forwards:
            lines.append(f"{f'{r.model} b{r.batch} {r.mode}':30s} {r.bf16_ms:8.2f} {r.fp8_ms:8.2f} "
                         f"{r.int4_ms:8.2f} {r.ratio:9.3f} {r.int4_sqnr_db:8.1f} "
                         f"{r.int4_emulated_sqnr_db:12.1f} {r.fp8_sqnr_db:7.1f} "
                         f"{r.int4_vs_emulated_db:20.1f}")
    return "\n".join(lines)
