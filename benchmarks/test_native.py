"""Per solver stage on CPU: the native op (fewstep::solver_update, csrc/solver_update.cpp) vs the PyTorch
reference ``solver_update_ref``, over every stage of a program (the network is not run: its output is fixed).

Target (issue 14): the native op >= 4x faster per stage at (8, 4, 32, 32) and at the demo's guided
(200, 1, 8, 8) (unipc, NFE 8, guidance 1.5).  The stochastic case shows the cost of drawing noise (the native
op draws Triton's Philox stream with the C library's logf / cosf; the reference uses torch's generator).
Run: ``pytest benchmarks/test_native.py --benchmark-only``; the summary table prints at the end.
"""

import statistics
import time

import pytest
import torch

import fewstep as fs
from fewstep.kernels import native
from fewstep.kernels.solver_update import StageUpdate, solver_update_ref

pytestmark = pytest.mark.skipif(not native.available("cpu"), reason="fewstep._C is not built")

VP = fs.ModelSpec(fs.schedules.DiscreteVP())
# (label, solver, nfe, guidance, shape)
CASES = [
    ("8x4x32x32 dpmpp_2m", "dpmpp_2m", 8, None, (8, 4, 32, 32)),
    ("demo 200x1x8x8 unipc cfg1.5", "unipc", 8, 1.5, (200, 1, 8, 8)),
    ("8x4x32x32 dpmpp_2m_sde (noise)", "dpmpp_2m_sde", 8, None, (8, 4, 32, 32)),
]
UPDATES = {"native": native.solver_update_native, "torch_ref": solver_update_ref}
PER_STAGE_US: dict[str, tuple[float, float]] = {}  # label -> (native, torch_ref)


def _stages(solver, nfe, guidance, shape):
    """Every stage's update and fixed buffers (state, network output per call, net_in, seed)."""
    prog = fs.solvers.build(solver, VP, nfe, guidance_scale=guidance)
    guided = guidance is not None
    g = torch.Generator().manual_seed(0)
    n = torch.Size(shape).numel()
    batch = (2 * shape[0] if guided else shape[0],) + tuple(shape[1:])
    state = torch.randn(len(prog.registers), n, generator=g)
    net_out = torch.randn(batch, generator=g)
    net_in = torch.zeros(batch)
    seed = torch.tensor([1], dtype=torch.int64)
    ups, k = [], 0
    for st in prog.stages:
        ups.append((StageUpdate.from_stage(st, prog.registers, guided, k), st.call is not None))
        k += int(st.noise)
    return ups, state, net_out, net_in, seed


def _interleaved_medians(runs: dict, reset, rounds: int = 60) -> dict:
    """Median seconds of each callable in ``runs``, timed in alternation so that every backend sees the same
    background load (this benchmark also runs on shared CI machines)."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            reset()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    rows = [f"{'case':34s} {'native us/stage':>16s} {'torch_ref us/stage':>19s} {'speedup':>8s}"]
    for label, *_ in CASES:
        if label in PER_STAGE_US:
            nat, ref = PER_STAGE_US[label]
            rows.append(f"{label:34s} {nat:16.1f} {ref:19.1f} {ref / nat:7.1f}x")
    if len(rows) > 1:
        print(f"\nCPU, {torch.get_num_threads()} threads (medians, the two backends timed in alternation)\n"
              + "\n".join(rows))


@pytest.mark.parametrize("backend", list(UPDATES))
@pytest.mark.parametrize("label,solver,nfe,guidance,shape", CASES, ids=[f"{c[4][0]}-{c[1]}" for c in CASES])
def test_stage_time(benchmark, backend, label, solver, nfe, guidance, shape):
    ups, state0, net_out, net_in, seed = _stages(solver, nfe, guidance, shape)
    state = state0.clone()

    def all_stages(update):
        for upd, called in ups:
            update(upd, state, net_out if called else None, net_in, seed)

    def reset():  # every round starts from the same state (a fixed network output fed back would grow)
        state.copy_(state0)

    benchmark.pedantic(all_stages, args=(UPDATES[backend],), setup=reset, rounds=100, warmup_rounds=5)
    assert torch.isfinite(state).all()
    benchmark.extra_info.update(stages=len(ups), threads=torch.get_num_threads())
    if backend == "native" and benchmark.stats is not None:  # stats is None under --benchmark-disable
        med = _interleaved_medians({k: (lambda u=u: all_stages(u)) for k, u in UPDATES.items()}, reset)
        per_stage = {k: v / len(ups) * 1e6 for k, v in med.items()}
        PER_STAGE_US[label] = (per_stage["native"], per_stage["torch_ref"])
        benchmark.extra_info.update(interleaved_per_stage_us=per_stage,
                                    speedup=per_stage["torch_ref"] / per_stage["native"])
