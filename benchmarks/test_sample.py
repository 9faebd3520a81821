"""A whole sample: DiT-XL/2 (random weights, bf16, guidance 4.0) as a plan vs diffusers' eager DiTPipeline
loop vs the network alone replayed NFE times from one CUDA graph (GPU only).

Targets (H100, batch 8, NFE 8): plan <= 1.03x the network graph; compile_network plan <= 80 ms
(set FEWSTEP_BENCH_COMPILE=1 to build it: minutes).  Batch 1: <= 35 ms.
"""

import dataclasses
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")

bench = pytest.importorskip("fewstep.bench")
pytest.importorskip("diffusers")

RESULTS = []


@pytest.fixture(scope="module", autouse=True)
def _save_results():
    yield
    if RESULTS:
        path = bench.save_results("sample", RESULTS, torch.device("cuda"), Path(__file__).parent / "results")
        print(f"\n{bench.format_table([], RESULTS)}\nwrote {path}")


@pytest.mark.parametrize("nfe", [4, 8])
@pytest.mark.parametrize("batch", [1, 8])
def test_dit_xl2_sample(benchmark, batch, nfe):
    compile_network = os.environ.get("FEWSTEP_BENCH_COMPILE") == "1" and batch == 8 and nfe == 8
    res = benchmark.pedantic(bench.bench_sample, args=(batch, nfe, torch.device("cuda")),
                             kwargs={"compile_network": compile_network}, rounds=1, iterations=1)
    RESULTS.append(res)
    benchmark.extra_info.update(dataclasses.asdict(res), overhead_ratio=res.overhead_ratio,
                                step_overhead_us=res.step_overhead_us)
    assert 0 < res.plan_ms < float("inf") and 0 < res.network_graph_ms < float("inf")
