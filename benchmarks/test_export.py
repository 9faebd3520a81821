"""Whole-plan ONNX export on the CPU: the exported digits plan on onnxruntime vs the torch plan, side by side.

Target (issue: the network alone measured 1.27x on onnxruntime): the exported plan >= 1.25x faster than the
torch plan on the same CPU at batch 100 with guidance (unipc, NFE 8).  Both run in the same process, their
calls interleaved round by round so that other load on the machine hits both alike; every time is one call
on the host clock (``fewstep.bench.timing.host_timed``), the median over the rounds.  The network alone (one
call at the plan's network batch, torch vs onnxruntime) is timed the same way, for reference.  The machine's
load average is recorded before and after: on a shared machine, read the ratio, not the milliseconds.

    python benchmarks/test_export.py              # prints the table
    pytest benchmarks/test_export.py --benchmark-only -s

DiT-XL/2 export time (random weights, NFE 8, guidance on, batch 1): ``FEWSTEP_BENCH_DITXL=1`` (minutes, about
10 GB of memory; the file keeps its 2.7 GB of fp32 weights in ``<file>.data``).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch

import fewstep as fs
from fewstep.bench.timing import host_timed

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class ExportBench:
    batch: int
    nfe: int
    guidance: float
    rounds: int
    torch_ms: float  # the torch plan (the project's CPU kernels, no CUDA graph), median per sample call
    ort_ms: float  # the exported plan on onnxruntime (CPU provider), median per sample call
    net_torch_ms: float  # one network call (batch 2 * batch), torch
    net_ort_ms: float  # the same call exported alone, onnxruntime
    export_s: float
    file_mb: float
    size_ratio: float  # file bytes over the network's parameter bytes
    max_rel_diff: float  # between the two samples
    torch_threads: int
    threads: int | None  # the intra-op threads asked of both libraries (None: their defaults)
    load_before: float  # 1-minute load average
    load_after: float

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.ort_ms

    @property
    def network_speedup(self) -> float:
        return self.net_torch_ms / self.net_ort_ms


def _interleaved_medians(fns, rounds: int) -> list[float]:
    for fn in fns:  # warm-up: first-call allocations, onnxruntime's arena
        fn()
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            t.append(host_timed(fn, CPU)[1])
    return [statistics.median(t) for t in times]


def bench_digits(batch: int = 100, nfe: int = 8, guidance: float = 2.0, rounds: int = 15,
                 threads: int | None = None) -> ExportBench:
    """threads: intra-op threads of both torch and onnxruntime (default: each library's own choice)."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench_digits(batch, nfe, guidance, rounds, threads)
    finally:
        torch.set_num_threads(old_threads)


def _bench_digits(batch, nfe, guidance, rounds, threads) -> ExportBench:
    from fewstep.export import export_network
    from fewstep.models import digits

    load_before = os.getloadavg()[0]
    dit, _ = digits.load_digits_dit()
    model, spec = fs.models.from_diffusers(dit, digits.digits_scheduler_config())
    labels = torch.arange(batch) % digits.NUM_CLASSES
    cond = {"class_labels": labels}
    plan = fs.compile(model, spec, solver="unipc", nfe=nfe, shape=(batch, *digits.SAMPLE_SHAPE),
                      guidance_scale=guidance, device=CPU, cond=cond)
    noise = torch.randn(plan.shape, generator=torch.Generator().manual_seed(0))
    x = torch.cat([noise, noise])
    t = torch.full((2 * batch,), 500.0)
    with tempfile.TemporaryDirectory() as tmp:
        report = plan.export_onnx(Path(tmp) / "digits.onnx")
        ort_plan = fs.load_onnx(report.path, threads=threads)
        export_network(model, Path(tmp) / "net.onnx", x=x, t=t, cond=cond)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        net_sess = ort.InferenceSession(str(Path(tmp) / "net.onnx"), sess_options=opts,
                                        providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "t": t.numpy(), "class_labels": labels.numpy()}

    def torch_net():
        with torch.no_grad():
            return model(x, t, **cond)

    torch_ms, ort_ms, net_torch_ms, net_ort_ms = _interleaved_medians(
        [lambda: plan(noise, **cond), lambda: ort_plan(noise, **cond), torch_net,
         lambda: net_sess.run(None, feeds)], rounds)
    a, b = plan(noise, **cond), ort_plan(noise, **cond)
    return ExportBench(batch=batch, nfe=nfe, guidance=guidance, rounds=rounds, torch_ms=torch_ms,
                       ort_ms=ort_ms, net_torch_ms=net_torch_ms, net_ort_ms=net_ort_ms,
                       export_s=report.seconds, file_mb=report.file_bytes / 1e6, size_ratio=report.size_ratio,
                       max_rel_diff=float((a - b).norm() / b.norm()), torch_threads=torch.get_num_threads(),
                       threads=threads, load_before=load_before, load_after=os.getloadavg()[0])


def format_row(r: ExportBench) -> str:
    return "\n".join([
        f"digits plan (unipc, NFE {r.nfe}, guidance {r.guidance:g}, batch {r.batch}), CPU, {os.cpu_count()} "
        f"cores, intra-op threads: {r.threads or 'each library default'} (torch {r.torch_threads}), load "
        f"average {r.load_before:.1f} -> {r.load_after:.1f}, median of {r.rounds} interleaved rounds",
        f"{'':24}{'torch':>12}{'onnxruntime':>14}{'speedup':>10}",
        f"{'whole sample (ms)':24}{r.torch_ms:12.1f}{r.ort_ms:14.1f}{r.speedup:9.2f}x",
        f"{'network call (ms)':24}{r.net_torch_ms:12.2f}{r.net_ort_ms:14.2f}{r.network_speedup:9.2f}x",
        f"export {r.export_s:.1f} s, file {r.file_mb:.2f} MB ({r.size_ratio:.3f}x the weights), samples "
        f"differ by {r.max_rel_diff:.1e} (relative L2)",
    ])


def test_digits_onnxruntime_vs_torch(benchmark):
    rounds = 3 if benchmark.disabled else 15  # `make test` runs benchmarks once, as a dry run
    r = benchmark.pedantic(bench_digits, kwargs={"rounds": rounds}, rounds=1, iterations=1)
    benchmark.extra_info.update(dataclasses.asdict(r), speedup=r.speedup, network_speedup=r.network_speedup)
    print("\n" + format_row(r))
    assert r.max_rel_diff <= 1e-4
    assert 0 < r.ort_ms < float("inf") and 0 < r.torch_ms < float("inf")


def bench_dit_xl2_export(nfe: int = 8, guidance: float = 4.0, batch: int = 1) -> dict:
    """Build a DiT-XL/2 plan (random weights, fp32, CPU) and time ``plan.export_onnx``."""
    import resource

    from fewstep.bench.models import DIT_XL_2, random_model

    net = random_model("DiTTransformer2DModel", DIT_XL_2, CPU, torch.float32)
    model, spec = fs.models.from_diffusers(net)
    t0 = time.perf_counter()
    plan = fs.compile(model, spec, solver="unipc", nfe=nfe, shape=(batch, 4, 32, 32), guidance_scale=guidance,
                      device=CPU, cond={"class_labels": torch.arange(batch)})
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        report = plan.export_onnx(Path(tmp) / "dit.onnx")
    return {"build_s": build_s, "export_s": report.seconds, "file_gb": report.file_bytes / 1e9,
            "size_ratio": report.size_ratio, "nodes": report.nodes,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "load_after": os.getloadavg()[0]}


@pytest.mark.skipif(os.environ.get("FEWSTEP_BENCH_DITXL") != "1",
                    reason="DiT-XL/2 export takes minutes and ~10 GB: set FEWSTEP_BENCH_DITXL=1")
def test_dit_xl2_export_time(benchmark):
    r = benchmark.pedantic(bench_dit_xl2_export, rounds=1, iterations=1)
    benchmark.extra_info.update(r)
    print(f"\nDiT-XL/2 (random weights, fp32, NFE 8, guidance 4, batch 1) on this CPU: plan build "
          f"{r['build_s']:.0f} s, export {r['export_s']:.0f} s, {r['file_gb']:.2f} GB "
          f"({r['size_ratio']:.3f}x the weights), {r['nodes']} nodes, peak RSS {r['peak_rss_gb']:.1f} GB")
    assert r["size_ratio"] <= 1.1


if __name__ == "__main__":
    print(format_row(bench_digits()))
    print(format_row(bench_digits(threads=1)))
    if os.environ.get("FEWSTEP_BENCH_DITXL") == "1":
        print(bench_dit_xl2_export())
