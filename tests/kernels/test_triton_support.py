"""The kernels' shared module: the row-kernel launch heuristic, the interpreter check, the launch checks, and
every kernel module importing (and its reference running) without triton."""

import os
import subprocess
import sys

import pytest
import torch

from fewstep.kernels import triton_support as ts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


# (width, block, num_warps): the next power of two, at least 16; 4 warps up to 2048 elements, 8 above
ROWS = [(1, 16, 4), (16, 16, 4), (17, 32, 4), (1000, 1024, 4), (1152, 2048, 4), (2048, 2048, 4),
        (2049, 4096, 8), (4608, 8192, 8), (12288, 16384, 8), (16384, 16384, 8)]


@pytest.mark.parametrize("width,block,num_warps", ROWS)
def test_row_config(width, block, num_warps):
    assert ts.row_config(width, "op") == ts.LaunchConfig(block, num_warps)
    if ts.triton is not None:  # an independent oracle for the block
        assert block == max(16, ts.triton.next_power_of_2(width))


def test_row_config_refuses_rows_wider_than_one_tile():
    with pytest.raises(ValueError, match=r"my_op holds a row in one tile: at most 16384 elements, got 16385"):
        ts.row_config(ts.MAX_ROW + 1, "my_op")


@pytest.mark.parametrize("block,num_warps,match", [(0, 4, "block"), (96, 4, "block: expected a power of two"),
                                                   (64, 3, "num_warps"), (64, 64, "num_warps")])
def test_launch_config_validates(block, num_warps, match):
    with pytest.raises(ValueError, match=match):
        ts.LaunchConfig(block, num_warps)


@pytest.mark.skipif(ts.triton is None, reason="needs triton")
def test_interpreting_matches_how_the_kernels_were_decorated():
    from triton.runtime.interpreter import InterpretedFunction

    from fewstep.kernels import quantize_fp8

    assert ts.interpreting() is isinstance(quantize_fp8._quantize_rows_kernel, InterpretedFunction)
    # tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA
    assert ts.interpreting() is (os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(ts.triton is None, reason="needs triton")
def test_interpreter_off_in_a_fresh_process():
    r = _python(
        "import torch\n"
        "from fewstep.kernels import triton_support as ts\n"
        "assert ts.interpreting() is False\n"
        "try:\n"
        "    ts.check_launch(torch.device('cpu'), 'quantize_fp8')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n",
        TRITON_INTERPRET=None,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "quantize_fp8 on CPU tensors needs TRITON_INTERPRET=1" in r.stdout
    assert "use quantize_fp8_ref" in r.stdout


@pytest.mark.skipif(ts.triton is None or torch.cuda.is_available(), reason="CPU under the interpreter")
def test_check_launch():
    ts.check_launch(torch.device("cpu"), "op")  # the interpreter runs CPU tensors
    with pytest.raises(RuntimeError, match=r"op runs on CUDA tensors .* got meta; use op_ref"):
        ts.check_launch(torch.device("meta"), "op")


_NO_TRITON = r'''
import importlib.abc
import sys


class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return None


sys.meta_path.insert(0, NoTriton())
for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
    del sys.modules[name]

import torch

import fewstep.kernels.solver_update as su
from fewstep.kernels import adaln_quant, fp8_gemm, quantize_fp8, triton_support

assert triton_support.triton is None and su.triton is None and triton_support.interpreting() is False
assert "triton" not in sys.modules

g = torch.Generator().manual_seed(0)
x = torch.randn(5, 40, generator=g)
q, s = quantize_fp8.quantize_fp8_ref(x)
assert (q.float() * s - x).abs().max() <= x.abs().max() / 16  # the reference runs without triton
upd = su.StageUpdate((0,), (0,), (0.5, 2.0), False, True, False, False, False)
state, out = torch.randn(1, 12, generator=g), torch.randn(12, generator=g)
want = 0.5 * out + 2.0 * state[0]
su.solver_update_ref(upd, state, out, None, None)
assert torch.allclose(state[0], want)

q16, s16 = quantize_fp8.quantize_fp8_ref(torch.randn(16, 32, generator=g))
calls = {
    "solver_update": lambda: su.solver_update(upd, state, out, None, None),
    "quantize_fp8": lambda: quantize_fp8.quantize_fp8(x),
    "adaln_quant": lambda: adaln_quant.adaln_quant(x.view(1, 5, 40), x[:1], x[1:2]),
    "fp8_gemm": lambda: fp8_gemm.fp8_gemm(q16, s16, q16, s16.reshape(-1)),
}
for op, call in calls.items():
    try:
        call()
    except RuntimeError as e:
        assert str(e) == f"{op} needs triton, which is not installed; use {op}_ref", str(e)
    else:
        raise AssertionError(f"{op} ran without triton")
print("ok")
'''


def test_kernel_modules_import_and_refs_run_without_triton():
    r = _python(_NO_TRITON)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
