"""Per solver step: the fused update replayed from a CUDA graph vs diffusers ``scheduler.step`` (GPU only).

Target (H100): <= 5 us per step at 8x4x32x32; within 2x of the copy-bandwidth floor at 1x16x128x128.
Run: ``pytest benchmarks/test_solver_step.py`` (results also go to benchmarks/results/solver_step-*.json).
"""

import dataclasses
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")

bench = pytest.importorskip("fewstep.bench")
pytest.importorskip("diffusers")

RESULTS = []


@pytest.fixture(scope="module")
def bandwidth():
    return bench.copy_bandwidth(torch.device("cuda"))


@pytest.fixture(scope="module", autouse=True)
def _save_results():
    yield
    if RESULTS:
        out = Path(__file__).parent / "results"
        path = bench.save_results("solver_step", RESULTS, torch.device("cuda"), out)
        print(f"\n{bench.format_table(RESULTS, [])}\nwrote {path}")


@pytest.mark.parametrize("shape", bench.STEP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("solver,options", bench.STEP_CASES, ids=[c[0] for c in bench.STEP_CASES])
def test_solver_step(benchmark, bandwidth, solver, options, shape):
    res = benchmark.pedantic(bench.bench_solver_step, args=(solver, options, shape, torch.device("cuda")),
                             kwargs={"bandwidth": bandwidth}, rounds=1, iterations=1)
    RESULTS.append(res)
    benchmark.extra_info.update(dataclasses.asdict(res), speedup=res.speedup)
    assert 0 < res.fused_us < float("inf") and 0 < res.diffusers_us < float("inf")
