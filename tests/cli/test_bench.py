"""``fewstep bench --dry-run``: every benchmark code path on tiny shapes, on the CPU (no results saved); the
benchmarks' timing helper and their model cache."""

import argparse
import time

import pytest
import torch

pytest.importorskip("diffusers")

from fewstep import bench  # noqa: E402
from fewstep.bench import models as bench_models  # noqa: E402
from fewstep.bench import timing  # noqa: E402
from fewstep.cli import bench as bench_cli  # noqa: E402
from fewstep.cli import main  # noqa: E402

CPU = torch.device("cpu")


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


@pytest.mark.parametrize("flag", ["--nfe", "--batch"])
@pytest.mark.parametrize("value", ["0", "-3", "2.5", "x"])
def test_counts_must_be_positive_integers(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--dry-run", flag, value])
    assert e.value.code == 2
    assert f"expected a positive integer, got '{value}'" in capsys.readouterr().err


# -- timing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("helper", [timing.median_ms, timing.graph_median_ms])
def test_cpu_timer_is_a_median_of_a_few_calls(helper):
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.002)

    ms = helper(fn, CPU)
    assert len(calls) == 1 + timing.CPU_ITERS  # one warm-up, then the timed calls
    assert 2.0 <= ms < 500.0  # at least the sleep; the bound only catches a wrong unit (seconds, us)


def test_host_timed_returns_the_result_and_milliseconds():
    out, ms = timing.host_timed(lambda: time.sleep(0.003) or 42, CPU)
    assert out == 42 and 3.0 <= ms < 500.0


def test_copy_bandwidth_is_gpu_only():
    assert timing.copy_bandwidth(CPU) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path times with triton.testing")
def test_cuda_timers():
    dev = torch.device("cuda")
    x = torch.randn(1 << 22, device=dev)
    y = torch.empty_like(x)
    big = torch.randn(1 << 24, device=dev)
    small_ms = timing.median_ms(lambda: y.copy_(x), dev)
    big_ms = timing.median_ms(lambda: big.mul_(1.0), dev)
    graph_ms = timing.graph_median_ms(lambda: y.copy_(x), dev)
    assert 0 < small_ms < big_ms and 0 < graph_ms < big_ms  # 4x the bytes takes longer
    assert timing.copy_bandwidth(dev) > 1e10


# -- models ---------------------------------------------------------------------------------------------
def test_random_model_is_built_once_seeded_and_leaves_the_rng_alone():
    import diffusers

    bench_models._build.cache_clear()
    rng = torch.get_rng_state()
    a = bench_models.random_model("DiTTransformer2DModel", bench.DIT_TINY, CPU, torch.float32)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random state is untouched
    assert bench_models.random_model("DiTTransformer2DModel", dict(bench.DIT_TINY), "cpu", torch.float32) is a
    torch.manual_seed(0)  # the oracle: the plain construction from the same seed
    want = diffusers.DiTTransformer2DModel(**bench.DIT_TINY).state_dict()
    got = a.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not a.training
    half = bench_models.random_model("DiTTransformer2DModel", bench.DIT_TINY, CPU, torch.bfloat16)
    assert half is not a and next(half.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(half.state_dict()[k], want[k].to(half.state_dict()[k].dtype)) for k in want)


def test_random_model_is_built_on_the_device(monkeypatch):
    """Parameters are created on the target device, not initialized on the CPU and copied."""
    import diffusers

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            seen.append(torch.empty(0).device)  # where tensors made in a constructor land
            self.lin = torch.nn.Linear(width, width)

    monkeypatch.setattr(diffusers, "Probe", Probe, raising=False)
    bench_models._build.cache_clear()
    m = bench_models.random_model("Probe", {"width": 3}, "meta", torch.float32)
    assert seen == [torch.device("meta")] and m.lin.weight.is_meta
    with pytest.raises(ValueError, match="diffusers has no model class 'NoSuchModel'"):
        bench_models.random_model("NoSuchModel", {}, CPU, torch.float32)
    with pytest.raises(ValueError, match="dtype: expected a floating-point torch.dtype, got torch.int64"):
        bench_models.random_model("Probe", {"width": 3}, CPU, torch.int64)
