"""Latency benchmarks (``fewstep bench``): the fused solver step and whole samples vs diffusers.

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

import math
import statistics
import time
from dataclasses import dataclass

import torch

from .timing import timer

__all__ = ["StepResult", "SampleResult", "bench_solver_step", "bench_sample", "format_table", "build_dit",
           "dit_fn", "dit_spec", "STEP_CASES", "STEP_SHAPES", "DIT_XL_2", "DIT_TINY"]

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


# -- 1. solver step ------------------------------------------------------------------------------------------
def dit_spec():
    from ..solvers import ModelSpec, schedules

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
    from ..kernels.solver_update import StageUpdate, solver_update, solver_update_ref
    from ..solvers import build, to_diffusers

    spec = dit_spec()
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

    time_fn = timer(device)
    if device.type == "cuda":
        one_pass()  # JIT every specialization before capture
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                one_pass()
        sec = time_fn(graph.replay, 3, iters) / reps
    else:
        sec = time_fn(one_pass, 1, iters)
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
def build_dit(config: dict, device, dtype):
    import diffusers

    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(**config)
    return m.to(device=device, dtype=dtype).eval()


def dit_fn(dit):
    try:
        from ..models import from_diffusers
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
    from .. import engine
    from ..solvers import to_diffusers

    dit = build_dit(config, device, dtype)
    fn = dit_fn(dit)
    spec = dit_spec()
    c, s = config["in_channels"], config["sample_size"]
    shape = (batch, c, s, s)
    labels = torch.arange(batch, device=device) % config["num_embeds_ada_norm"]
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    time_fn = timer(device)

    with torch.no_grad():
        t0 = time.perf_counter()
        plan = engine.compile(fn, spec, solver=solver, nfe=nfe, shape=shape, dtype=dtype,
                              guidance_scale=guidance_scale, device=device, cond={"class_labels": labels})
        build_s = time.perf_counter() - t0
        plan_s = time_fn(lambda: plan(noise, class_labels=labels, copy=False), 2, iters)

        compiled_ms = compiled_build = None
        if compile_network and device.type == "cuda":
            t0 = time.perf_counter()
            cplan = engine.compile(fn, spec, solver=solver, nfe=nfe, shape=shape, dtype=dtype,
                                   guidance_scale=guidance_scale, device=device,
                                   cond={"class_labels": labels}, compile_network=True)
            compiled_build = time.perf_counter() - t0
            compiled_ms = time_fn(lambda: cplan(noise, class_labels=labels, copy=False), 2, iters) * 1e3

        sched = to_diffusers(solver, spec)
        lat = noise.to(dtype)
        diff_s = time_fn(lambda: _diffusers_dit_loop(dit, sched, lat, labels, nfe, guidance_scale), 1,
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
            net_s = time_fn(graph.replay, 2, iters)
        else:
            net_s = time_fn(net_calls, 1, iters)
    return SampleResult(batch, nfe, guidance_scale, solver, plan_s * 1e3, build_s, diff_s * 1e3, net_s * 1e3,
                        compiled_ms, compiled_build)



# -- reporting -----------------------------------------------------------------------------------------------
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
