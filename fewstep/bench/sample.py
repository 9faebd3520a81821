"""Latency benchmarks (``fewstep bench``): the fused solver step and whole samples vs diffusers.

1. Per solver step: every stage update of an ``nfe``-step program, replayed from a CUDA graph (the network
   output is a static random tensor), per network call; against diffusers' ``scheduler.step`` for the same
   solver, host-timed with a synchronize after each step, as a user's loop runs it.  The floor is the bytes
   the fused updates move at the device's copy bandwidth.
2. A whole sample with DiT-XL/2 (random weights, bf16, guidance on): the plan vs diffusers' eager DiTPipeline
   loop vs the network alone replayed ``nfe`` times from one graph (the floor without fusion).

Timings come from :mod:`fewstep.bench.timing`.  ``--dry-run`` runs every code path with tiny shapes on any
device; results files are written only from GPU runs (:mod:`fewstep.bench.results`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from .models import DIT_TINY, DIT_XL_2, random_model
from .timing import CPU_ITERS, graph_median_ms, host_timed, median_ms

__all__ = ["StepResult", "SampleResult", "bench_solver_step", "bench_sample", "format_table", "build_dit",
           "dit_fn", "dit_spec", "STEP_CASES", "STEP_SHAPES", "DIT_XL_2", "DIT_TINY"]

# (fewstep solver, options): a second-order multistep, a third-order predictor-corrector, a first-order and a
# distilled-model sampler
STEP_CASES: tuple[tuple[str, dict], ...] = (
    ("dpmpp_2m", {}), ("unipc", {"order": 3}), ("euler", {}), ("lcm", {}))
STEP_SHAPES = ((8, 4, 32, 32), (1, 16, 128, 128))
DIFFUSERS_STEP_LOOPS = 10  # eager scheduler loops timed on the GPU (their median counts)


@dataclass(frozen=True)
class StepResult:
    solver: str
    shape: tuple[int, ...]
    nfe: int
    fused_us: float          # per network call, all of that call's stage updates, replayed from a graph
    diffusers_us: float      # per scheduler.step, host-timed with a synchronize after each step
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
    network_graph_ms: float     # the network alone, nfe calls replayed from one graph
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
                      nfe: int = 8, bandwidth: float | None = None) -> StepResult:
    """Fused updates (every stage of the program, replayed from a graph) vs diffusers ``scheduler.step``."""
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

    fused_us = graph_median_ms(one_pass, device) / nfe * 1e3
    moved = sum(_stage_bytes(u, n, 4, 4) for u in upds)
    floor = None if bandwidth is None else moved / bandwidth / nfe * 1e6

    sched = to_diffusers(solver, spec, **options)
    sample0 = torch.randn(shape, generator=g).to(device)
    model_out = torch.randn(shape, generator=g).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    kw = {"generator": gen} if "generator" in sched.step.__code__.co_varnames else {}

    def diffusers_loop() -> float:
        """Milliseconds spent in scheduler.step over one sample."""
        sched.set_timesteps(nfe, device=device)
        x, total = sample0, 0.0
        for t in sched.timesteps:
            sched.scale_model_input(x, t)  # some schedulers insist on it; not timed
            out, ms = host_timed(lambda t=t, x=x: sched.step(model_out, t, x, **kw), device)
            x, total = out.prev_sample, total + ms
        return total

    diffusers_loop()  # warm-up
    loops = DIFFUSERS_STEP_LOOPS if device.type == "cuda" else CPU_ITERS
    d_us = statistics.median(diffusers_loop() for _ in range(loops)) / nfe * 1e3
    return StepResult(solver, tuple(shape), nfe, fused_us, d_us, floor, len(upds) / nfe)


# -- 2. whole sample -----------------------------------------------------------------------------------------
def build_dit(config: dict, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """A DiTTransformer2DModel with random weights (built once per process: :func:`~.models.random_model`)."""
    return random_model("DiTTransformer2DModel", config, device, dtype)


def dit_fn(dit):
    from ..models import from_diffusers

    return from_diffusers(dit)[0]


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
                 compile_network: bool = False) -> SampleResult:
    """DiT sample: plan vs diffusers' eager loop vs the network alone replayed from one graph."""
    from .. import engine
    from ..solvers import to_diffusers

    dit = build_dit(config, device, dtype)
    fn = dit_fn(dit)
    spec = dit_spec()
    c, s = config["in_channels"], config["sample_size"]
    shape = (batch, c, s, s)
    labels = torch.arange(batch, device=device) % config["num_embeds_ada_norm"]
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    rep = 1000.0  # ms of calls per timing: several samples even at tens of ms each

    def build_plan(**extra):
        return engine.compile(fn, spec, solver=solver, nfe=nfe, shape=shape, dtype=dtype,
                              guidance_scale=guidance_scale, device=device, cond={"class_labels": labels},
                              **extra)

    with torch.no_grad():
        plan, build_ms = host_timed(build_plan, device)
        plan_ms = median_ms(lambda: plan(noise, class_labels=labels, copy=False), device, rep_ms=rep)

        compiled_ms = compiled_build_s = None
        if compile_network and device.type == "cuda":
            cplan, cbuild_ms = host_timed(lambda: build_plan(compile_network=True), device)
            compiled_build_s = cbuild_ms / 1e3
            compiled_ms = median_ms(lambda: cplan(noise, class_labels=labels, copy=False), device, rep_ms=rep)

        sched = to_diffusers(solver, spec)
        lat = noise.to(dtype)
        diff_ms = median_ms(lambda: _diffusers_dit_loop(dit, sched, lat, labels, nfe, guidance_scale), device,
                            rep_ms=rep)

        x2 = torch.cat([lat, lat])
        t2 = torch.full((2 * batch,), 500.0, device=device)

        def net_calls():
            for _ in range(nfe):
                fn(x2, t2, class_labels=labels)

        net_ms = graph_median_ms(net_calls, device)
    return SampleResult(batch, nfe, guidance_scale, solver, plan_ms, build_ms / 1e3, diff_ms, net_ms,
                        compiled_ms, compiled_build_s)

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
