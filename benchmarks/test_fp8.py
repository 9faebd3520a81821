"""FP8 layers on the GPU: the FP8 GEMM vs torch._scaled_mm and cuBLAS bf16, the fused producer + GEMM vs
bf16, and a DiT-XL/2 forward at batch 16 replayed from a CUDA graph.

Targets (H100): fp8_gemm >= 0.9x ``torch._scaled_mm`` (per-row scales, fast accumulation) on DiT-XL/2 shapes
at M in {512, 2048, 4096, 8192}; fused producer + quantization + GEMM >= 1.25x the bf16 producer + GEMM at
M >= 4096; the FP8 DiT-XL/2 forward at batch 16 <= 6.7 ms.  The asserts check that each measurement ran and
is finite; the targets are printed and recorded, not asserted (a slower GPU is not a failure).  Each GEMM's
output is checked against ``torch._scaled_mm`` (same E4M3 operands and scales, bf16 out): >= 40 dB, the
bf16 output rounding (~53 dB) with room for the two kernels' different fast-accumulation orders.
Run: ``pytest benchmarks/test_fp8.py`` (results also go to benchmarks/results/fp8_*.json, or to the folder
in ``FEWSTEP_RESULTS_DIR``: ``make gpu-check`` sets it).
"""

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="GPU benchmark: needs a CUDA GPU with FP8 tensor cores (sm_89+)")

bench = pytest.importorskip("fewstep.bench")
fp8 = pytest.importorskip("fewstep.bench.fp8")
pytest.importorskip("diffusers")

RESULTS: dict[str, list] = {"fp8_gemm": [], "fp8_producer": [], "fp8_forward": []}
DEV = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def _save_results():
    yield
    out = Path(os.environ.get("FEWSTEP_RESULTS_DIR") or Path(__file__).parent / "results")
    for kind, res in RESULTS.items():
        if res:
            print(f"\nwrote {bench.save_results(kind, res, DEV, out)}")
    print("\n" + fp8.format_fp8_table(RESULTS["fp8_gemm"], RESULTS["fp8_producer"], RESULTS["fp8_forward"]))


def _finite(*xs):
    return all(x is not None and 0 < x < math.inf for x in xs)


@pytest.mark.parametrize("nk", fp8.DIT_XL_2_GEMMS, ids=lambda nk: f"N{nk[0]}-K{nk[1]}")
@pytest.mark.parametrize("m", fp8.GEMM_M)
def test_fp8_gemm(benchmark, m, nk):
    res = benchmark.pedantic(fp8.bench_gemm, args=(m, *nk, DEV), rounds=1, iterations=1)
    RESULTS["fp8_gemm"].append(res)
    benchmark.extra_info.update(dataclasses.asdict(res), vs_scaled_mm=res.vs_scaled_mm, tflops=res.tflops)
    assert _finite(res.fp8_us, res.scaled_mm_us, res.bf16_us)
    assert res.sqnr_vs_scaled_mm_db >= 40.0, res


@pytest.mark.parametrize("n", (3456, 4608))
@pytest.mark.parametrize("m", fp8.GEMM_M)
def test_fused_producer(benchmark, m, n):
    res = benchmark.pedantic(fp8.bench_producer, args=(m, 1152, n, DEV), rounds=1, iterations=1)
    RESULTS["fp8_producer"].append(res)
    benchmark.extra_info.update(dataclasses.asdict(res), speedup=res.speedup)
    assert _finite(res.fused_us, res.bf16_us, res.eager_quant_us)


def test_dit_xl_2_forward_batch_16(benchmark):
    res = benchmark.pedantic(fp8.bench_dit_forward, args=(16, DEV), rounds=1, iterations=1)
    RESULTS["fp8_forward"].append(res)
    benchmark.extra_info.update(dataclasses.asdict(res), ratio=res.ratio)
    assert _finite(res.bf16_ms, res.fp8_ms)
