"""``fewstep bench --dry-run``: every benchmark code path on tiny shapes, on the CPU (no results saved)."""

import argparse

import pytest
import torch

pytest.importorskip("diffusers")

from fewstep import bench  # noqa: E402
from fewstep.cli import bench as bench_cli  # noqa: E402


def _args(*argv):
    p = argparse.ArgumentParser()
    bench_cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_dry_run_prints_one_table(capsys, tmp_path):
    assert bench_cli.run(_args("--dry-run", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    for solver, _ in bench.STEP_CASES:
        assert solver in out
    assert "plan ms" in out and "diffusers ms" in out and "nan" not in out.lower()
    assert not list(tmp_path.iterdir())  # dry runs never write results


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_real_run_needs_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="CUDA"):
        bench_cli.run(_args("step", "--out", str(tmp_path)))
    with pytest.raises(ValueError, match="GPU"):
        bench.save_results("x", [], torch.device("cpu"), tmp_path)
