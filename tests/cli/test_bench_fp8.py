"""``fewstep bench --quant fp8 --dry-run``: every FP8 benchmark path with tiny shapes, on any device."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("triton")

from fewstep.bench import DIT_TINY  # noqa: E402
from fewstep.bench.sample import build_dit  # noqa: E402
from fewstep.cli import main  # noqa: E402
from fewstep.quant import quantized_layers  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is benchmarks/test_fp8.py")
def test_dry_run_prints_every_table(capsys):
    assert main(["bench", "--quant", "fp8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for head in ("fp8 gemm", "producer+gemm", "DiT forward", "quality"):
        assert head in out
    assert "nan" not in out.lower()
    # the forward benchmark quantized a copy: the cached DiT the next benchmark gets is still unquantized
    assert quantized_layers(build_dit(DIT_TINY, torch.device("cpu"), torch.float32)) == {}


def test_timing_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert main(["bench", "--quant", "fp8", "--fp8-what", "gemm"]) != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err
