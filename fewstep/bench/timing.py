"""One timing helper for every fewstep benchmark: ``timer(device)(fn, warmup, iters) -> median seconds``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["timer", "copy_bandwidth"]


def timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    """``time(fn, warmup, iters) -> median seconds``: CUDA events on the GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        def time_cuda(fn, warmup, iters):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize(device)
            times = []
            for _ in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return statistics.median(times)
        return time_cuda

    def time_cpu(fn, warmup, iters):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return time_cpu


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (read + written), None off the GPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sec = timer(device)(lambda: dst.copy_(src), 3, 20)
    return 2 * src.numel() / sec


