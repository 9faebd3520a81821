"""``fewstep bench``: the fused solver step and whole samples against diffusers, as one table.

1. Per solver step: every stage update of an ``nfe``-step program replayed inside one CUDA graph (the
   network output is a static random tensor), per network call; against diffusers' ``scheduler.step`` for the
   same solver (host-timed with a synchronize, as BASELINES.md measures it).  The floor is the bytes the fused
   updates move at the device's copy bandwidth.
2. A whole sample with DiT-XL/2 (random weights, bf16, guidance on): the plan vs diffusers' eager DiTPipeline
   loop vs the network alone replayed ``nfe`` times in one graph (the floor without fusion).

Results go to ``benchmarks/results/*.json`` (GPU name, torch / triton / diffusers versions, git SHA) only from
real GPU runs.  ``--dry-run`` runs every code path with tiny shapes on any device and saves nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["add_arguments", "run", "StepResult", "SampleResult", "bench_solver_step", "bench_sample",
           "STEP_CASES", "DIT_XL_2"]

# (fewstep solver, options): the four
STEP_CASES: tuple[tuple[str, dict], ...] = (
    ("dpmpp_2m", {}), ("unipc", {"order": 3}), ("euler", {}), ("lcm", {}))
STEP_SHAPES = ((8, 4, 32, 32), (1, 16, 128, 128))
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
DIT_TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10)
DIT_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


@dataclass(frozen=True)
class StepResult:
    solver: str
    shape: tuple[int, ...]
    nfe: int
    fused_us: float          # per network call, all of that call's stage updates, inside one graph
    diffusers_us: float      # per scheduler.step, host-timed with synchronize
    floor_us: float | None   # bytes moved by the fused updates at the measured copy bandwidth
    kernels_per_step: float

    @property
    def speedup(self) -> float:
        return self.diffusers_us / self.fused_us


@dataclass(frozen=True)
class SampleResult:
    batch: int
    nfe: int
    guidance_scale: float
    solver: str
    plan_ms: float
    plan_build_s: float
    diffusers_ms: float
    network_graph_ms: float     # the network alone, nfe calls replayed in one graph
    compiled_plan_ms: float | None = None
    compiled_plan_build_s: float | None = None

    @property
    def overhead_ratio(self) -> float:
        """Plan latency / the network calls it contains (target <= 1.03)."""
        return self.plan_ms / self.network_graph_ms

    @property
    def step_overhead_us(self) -> float:
        return (self.plan_ms - self.network_graph_ms) / self.nfe * 1e3


# -- timing --------------------------------------------------------------------------------------------------
def _timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
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
    sec = _timer(device)(lambda: dst.copy_(src), 3, 20)
    return 2 * src.numel() / sec


# -- 1. solver step ------------------------------------------------------------------------------------------
def _dit_spec():
    from .solvers import ModelSpec, schedules

    return ModelSpec(schedules.DiscreteVP(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"))


def _stage_bytes(upd, n: int, out_bytes: int, in_bytes: int) -> int:
    g = 2 if upd.guided else 1
    b = 4 * n * (len(upd.reg_in) + len(upd.reg_out))
    b += out_bytes * n * (int(upd.has_ou) + int(upd.has_oc))
    b += in_bytes * g * n * int(upd.has_net_in)
    return b


def bench_solver_step(solver: str, options: dict, shape: tuple[int, ...], device: torch.device, *,
                      nfe: int = 8, reps: int = 20, iters: int = 50,
                      bandwidth: float | None = None) -> StepResult:
    """Fused updates (one graph holding ``reps`` passes over every stage) vs diffusers ``scheduler.step``."""
    from .kernels.solver_update import StageUpdate, solver_update, solver_update_ref
    from .solvers import build, to_diffusers

    spec = _dit_spec()
    prog = build(solver, spec, nfe, **options)
    n = math.prod(shape)
    g = torch.Generator(device="cpu").manual_seed(0)
    state = torch.randn(len(prog.registers), n, generator=g).to(device)
    net_out = torch.randn(shape, generator=g).to(device)
    net_in = torch.empty(shape, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    upds, k = [], 0
    for st in prog.stages:
        upds.append(StageUpdate.from_stage(st, prog.registers, False, k))
        k += int(st.noise)
    fused = solver_update if device.type == "cuda" else solver_update_ref

    def one_pass():
        for u in upds:
            fused(u, state, net_out if (u.has_oc or u.has_ou) else None, net_in, seed)

    timer = _timer(device)
    if device.type == "cuda":
        one_pass()  # JIT every specialization before capture
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                one_pass()
        sec = timer(graph.replay, 3, iters) / reps
    else:
        sec = timer(one_pass, 1, iters)
    fused_us = sec / nfe * 1e6
    moved = sum(_stage_bytes(u, n, 4, 4) for u in upds)
    floor = None if bandwidth is None else moved / bandwidth / nfe * 1e6

    sched = to_diffusers(solver, spec, **options)
    sample0 = torch.randn(shape, generator=g).to(device)
    model_out = torch.randn(shape, generator=g).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    kw = {"generator": gen} if "generator" in sched.step.__code__.co_varnames else {}

    def diffusers_loop():  # seconds spent in scheduler.step over one sample (synchronized, as BASELINES.md)
        sched.set_timesteps(nfe, device=device)
        x, total = sample0, 0.0
        for t in sched.timesteps:
            sched.scale_model_input(x, t)  # some schedulers insist on it; not timed
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            x = sched.step(model_out, t, x, **kw).prev_sample
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total += time.perf_counter() - t0
        return total

    diffusers_loop()
    d_us = statistics.median(diffusers_loop() for _ in range(max(3, iters // 5))) / nfe * 1e6
    return StepResult(solver, tuple(shape), nfe, fused_us, d_us, floor, len(upds) / nfe)


# -- 2. whole sample -----------------------------------------------------------------------------------------
def _dit(config: dict, device, dtype):
    import diffusers

    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(**config)
    return m.to(device=device, dtype=dtype).eval()


def _dit_fn(dit):
    try:
        from .models import from_diffusers
    except ImportError:  # pragma: no cover - the adapters ship with fewstep
        from_diffusers = None
    if from_diffusers is not None:
        return from_diffusers(dit)[0]
    null = dit.config.num_embeds_ada_norm

    def fn(x, t, class_labels):
        if x.shape[0] == 2 * class_labels.shape[0]:
            class_labels = torch.cat([torch.full_like(class_labels, null), class_labels])
        return dit(x, timestep=t, class_labels=class_labels, return_dict=False)[0][:, : x.shape[1]]
    return fn


def _diffusers_dit_loop(dit, sched, latents, labels, nfe, guidance_scale):
    """DiTPipeline.__call__'s denoising loop with guidance (steps the doubled batch, as it does), no VAE."""
    null = torch.full_like(labels, dit.config.num_embeds_ada_norm)
    class_in = torch.cat([labels, null])
    model_in = torch.cat([latents, latents])
    c = dit.config.in_channels
    sched.set_timesteps(nfe)
    for t in sched.timesteps:
        half = model_in[: len(model_in) // 2]
        model_in = sched.scale_model_input(torch.cat([half, half]), t)
        ts = t[None].to(model_in.device).expand(model_in.shape[0])
        out = dit(model_in, timestep=ts, class_labels=class_in).sample
        eps, rest = out[:, :c], out[:, c:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        out = torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
        model_out = torch.split(out, c, dim=1)[0] if dit.config.out_channels // 2 == c else out
        model_in = sched.step(model_out, t, model_in).prev_sample
    return model_in[: len(model_in) // 2]


def bench_sample(batch: int, nfe: int, device: torch.device, *, guidance_scale: float = 4.0,
                 solver: str = "dpmpp_2m", dtype: torch.dtype = torch.bfloat16, config: dict = DIT_XL_2,
                 compile_network: bool = False, iters: int = 10) -> SampleResult:
    """DiT sample: plan vs diffusers' eager loop vs the network alone in one graph."""
    from . import engine
    from .solvers import to_diffusers

    dit = _dit(config, device, dtype)
    fn = _dit_fn(dit)
    spec = _dit_spec()
    c, s = config["in_channels"], config["sample_size"]
    shape = (batch, c, s, s)
    labels = torch.arange(batch, device=device) % config["num_embeds_ada_norm"]
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    timer = _timer(device)

    with torch.no_grad():
        t0 = time.perf_counter()
        plan = engine.compile(fn, spec, solver=solver, nfe=nfe, shape=shape, dtype=dtype,
                              guidance_scale=guidance_scale, device=device, cond={"class_labels": labels})
        build_s = time.perf_counter() - t0
        plan_s = timer(lambda: plan(noise, class_labels=labels, copy=False), 2, iters)

        compiled_ms = compiled_build = None
        if compile_network and device.type == "cuda":
            t0 = time.perf_counter()
            cplan = engine.compile(fn, spec, solver=solver, nfe=nfe, shape=shape, dtype=dtype,
                                   guidance_scale=guidance_scale, device=device,
                                   cond={"class_labels": labels}, compile_network=True)
            compiled_build = time.perf_counter() - t0
            compiled_ms = timer(lambda: cplan(noise, class_labels=labels, copy=False), 2, iters) * 1e3

        sched = to_diffusers(solver, spec)
        lat = noise.to(dtype)
        diff_s = timer(lambda: _diffusers_dit_loop(dit, sched, lat, labels, nfe, guidance_scale), 1,
                       max(3, iters // 2))

        x2 = torch.cat([lat, lat])
        t2 = torch.full((2 * batch,), 500.0, device=device)

        def net_calls():
            for _ in range(nfe):
                fn(x2, t2, class_labels=labels)

        if device.type == "cuda":
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                net_calls()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                net_calls()
            net_s = timer(graph.replay, 2, iters)
        else:
            net_s = timer(net_calls, 1, iters)
    return SampleResult(batch, nfe, guidance_scale, solver, plan_s * 1e3, build_s, diff_s * 1e3, net_s * 1e3,
                        compiled_ms, compiled_build)


# -- reporting -----------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import diffusers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name,
            "torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
            "git_sha": sha, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_results(kind: str, results: list, device: torch.device, out_dir: Path) -> Path:
    """Write ``{environment, results}`` to ``out_dir/<kind>-<gpu>-<time>.json`` (real GPU runs only)."""
    if device.type != "cuda":
        raise ValueError("benchmark results are saved only from GPU runs")
    env = environment(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()
    path = out_dir / f"{kind}-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    rows = [dict(dataclasses.asdict(r), **{p: getattr(r, p) for p in ("speedup", "overhead_ratio",
                                                                       "step_overhead_us") if hasattr(r, p)})
            for r in results]
    path.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    return path


def format_table(steps: list[StepResult], samples: list[SampleResult]) -> str:
    lines = []
    if steps:
        lines.append(f"{'solver step':14s} {'shape':>16s} {'fused us':>9s} {'diffusers us':>13s} "
                     f"{'speedup':>8s} {'floor us':>9s} {'kernels':>8s}")
        for r in steps:
            floor = f"{r.floor_us:9.2f}" if r.floor_us is not None else f"{'-':>9s}"
            shape = "x".join(map(str, r.shape))
            lines.append(f"{r.solver:14s} {shape:>16s} {r.fused_us:9.2f} {r.diffusers_us:13.1f} "
                         f"{r.speedup:7.1f}x {floor} {r.kernels_per_step:8.2f}")
    if samples:
        if lines:
            lines.append("")
        lines.append(f"{'sample':22s} {'plan ms':>9s} {'build s':>8s} {'diffusers ms':>13s} {'speedup':>8s} "
                     f"{'net graph ms':>13s} {'plan/net':>9s} {'us/step over':>13s} {'compiled ms':>12s}")
        for r in samples:
            comp = "-"
            if r.compiled_plan_ms is not None:
                comp = f"{r.compiled_plan_ms:7.2f} ({r.compiled_plan_build_s:.0f}s)"
            name = f"{r.solver} b{r.batch} nfe{r.nfe} w{r.guidance_scale:g}"
            lines.append(f"{name:22s} {r.plan_ms:9.2f} {r.plan_build_s:8.2f} {r.diffusers_ms:13.2f} "
                         f"{r.diffusers_ms / r.plan_ms:7.2f}x {r.network_graph_ms:13.2f} "
                         f"{r.overhead_ratio:9.3f} "
                         f"{r.step_overhead_us:13.1f} {comp:>12s}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", choices=("all", "step", "sample"), default="all")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on any device (CPU included): exercise every path, save nothing")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="DiT sample batch sizes")
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 8], help="DiT sample NFEs")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--solver", default="dpmpp_2m", help="solver of the DiT sample")
    parser.add_argument("--compile-network", action="store_true",
                        help="also build a compile_network=True plan (minutes); reports its build time")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--quant", choices=("fp8",), default=None,
                        help="benchmark FP8 layers instead (GEMM, fused producer, DiT-XL/2 forward, quality)")
    parser.add_argument("--fp8-what", default="all",
                        choices=("all", "gemm", "producer", "forward", "quality"),
                        help="with --quant fp8: which part (`quality` also runs on the CPU, emulated)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "quant", None) == "fp8":
        from .quant.bench_fp8 import run_quant

        return run_quant(args)
    dry = args.dry_run
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not dry:
        raise ValueError("fewstep bench needs a CUDA GPU (use --dry-run to exercise it on the CPU)")
    steps, samples = [], []
    if args.what in ("all", "step"):
        shapes = ((3, 4, 8, 8),) if dry else STEP_SHAPES
        bw = None if dry else copy_bandwidth(device)
        for solver, opts in STEP_CASES:
            for shape in shapes:
                steps.append(bench_solver_step(solver, opts, shape, device, nfe=4 if dry else 8,
                                               iters=3 if dry else 50, bandwidth=bw))
    if args.what in ("all", "sample"):
        batches, nfes = ([1], [2]) if dry else (args.batch, args.nfe)
        for b in batches:
            for nfe in nfes:
                samples.append(bench_sample(
                    b, nfe, device, guidance_scale=args.guidance_scale, solver=args.solver,
                    dtype=torch.float32 if dry else torch.bfloat16, config=DIT_TINY if dry else DIT_XL_2,
                    compile_network=args.compile_network and not dry, iters=2 if dry else 10))
    print(format_table(steps, samples))
    if not dry and not args.no_save:
        for kind, res in (("solver_step", steps), ("sample", samples)):
            if res:
                print(f"wrote {save_results(kind, res, device, args.out)}")
    return 0
