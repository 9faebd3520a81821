"""The interpreter does not prove the INT4 kernels compile for a GPU: compile them ahead of time with Triton's
bundled ptxas for Hopper (sm_90) and Ada (sm_89), as tests/kernels/test_fp8_aot.py does for FP8."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_AOT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fewstep.kernels import int4_gemm as I

ALIGNED = [["tt.divisibility", 16]]


def compile_(fn, sig, consts, cc, aligned=(), **opts):
    sig = dict(sig, **{c: "constexpr" for c in consts})
    src = ASTSource(fn, sig, consts, attrs={(i,): ALIGNED for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)


for cc in (89, 90):
    compile_(I._pack_int4_kernel, {"q_ptr": "*u8", "out_ptr": "*u8", "total": "i32"}, {"BLOCK": 1024}, cc)
    compile_(I._unpack_int4_kernel, {"p_ptr": "*u8", "out_ptr": "*u8", "total": "i32"}, {"BLOCK": 1024}, cc)
    for kind, a_ty in (("w4a16", "*bf16"), ("w4a8", "*fp8e4nv")):
        for m in (16, 512, 8192):
            cfg = I.int4_config(kind, m, 128, "cuda")
            if cc == 89 and m == 8192:
                continue  # the widest tile is for Hopper's shared memory
            sig = {"a_ptr": a_ty, "w_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*u8", "out_ptr": "*bf16",
                   "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16", "res_ptr": "*bf16",
                   "gate_ptr": "*bf16", "tokens": "i32", "gate_stride": "i32", "M": "i32", "N": "i32",
                   "K": "i32", "stride_am": "i32"}
            consts = {"W4A8": kind == "w4a8", "HAS_ZERO": m == 512, "G": 128, "UPCAST": False,
                      "ROW_SCALE": kind == "w4a8", "HAS_BIAS": True, "GELU": 1, "GATED_RES": m == 16,
                      "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                      "GROUP_M": cfg.group_m}
            k = compile_(I._int4_gemm_kernel, sig, consts, cc, aligned=(0, 1, 2, 4, 13, 14, 15),
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            ptx = k.asm["ptx"]
            if kind == "w4a8":
                assert "e4m3" in ptx, (cc, kind, m)
            if cfg.block_m >= 64:  # tensor-core MMAs (Triton uses FMA for tiles below the MMA size)
                mma = ("wgmma" in ptx or "mma.sync" in ptx) if cc == 90 else "mma.sync" in ptx
                assert mma, (cc, kind, m)
print("ok")
"""


def test_int4_kernels_compile_for_hopper_and_ada():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("ptxas not available")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
