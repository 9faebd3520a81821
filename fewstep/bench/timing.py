"""The one timing module of fewstep's benchmarks.

On CUDA every GPU time comes from Triton's benchmark helpers, in milliseconds, as a median:

* :func:`median_ms`: ``triton.testing.do_bench`` -- CUDA events around each call, the L2 cache flushed
  between calls, calls repeated for ``rep_ms``.  For anything that cannot be captured in a CUDA graph (a plan
  call, which replays its own graph; an eager diffusers loop).
* :func:`graph_median_ms`: ``triton.testing.do_bench_cudagraph`` -- the calls captured in one CUDA graph and
  replayed, so host launch overhead drops out.  For graph-capturable work (fused solver updates, a network
  forward).

:func:`host_timed` is the one host-clock measurement: a single call between two device synchronizations, as a
user's eager loop that synchronizes after each step sees it (diffusers' ``scheduler.step``, a plan build).

Off CUDA :func:`median_ms` and :func:`graph_median_ms` fall back to a plain ``time.perf_counter`` timer over
:data:`CPU_ITERS` calls: in the CPU dry run it shows the code runs, not how fast a GPU is; it also times
host-only work (building a StepProgram).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["median_ms", "graph_median_ms", "host_timed", "copy_bandwidth", "CPU_ITERS"]

T = TypeVar("T")
CPU_ITERS = 3  # timed calls of the CPU dry run, after one warm-up call


def median_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: float = 100.0) -> float:
    """Median milliseconds per call of ``fn`` on ``device``: ``do_bench`` for ``rep_ms`` on CUDA."""
    if device.type != "cuda":
        return _cpu_median_ms(fn)
    do_bench = _triton_testing().do_bench
    with torch.cuda.device(device):
        return float(do_bench(fn, rep=rep_ms, return_mode="median"))


def graph_median_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: float = 20.0) -> float:
    """Median milliseconds per call of ``fn`` replayed from a CUDA graph (``do_bench_cudagraph``); ``fn`` must
    be capturable (no host syncs, no allocations that outlive the call)."""
    if device.type != "cuda":
        return _cpu_median_ms(fn)
    do_bench_cudagraph = _triton_testing().do_bench_cudagraph
    with torch.cuda.device(device):
        return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def host_timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``(fn(), milliseconds)``: one call on the host clock, the device synchronized before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), None off the GPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (ms * 1e-3)


def _cpu_median_ms(fn: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(CPU_ITERS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _triton_testing():
    try:
        import triton.testing
    except ImportError as e:
        raise RuntimeError("GPU timings use triton.testing.do_bench; install triton") from e
    return triton.testing
