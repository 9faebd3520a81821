"""fp8_gemm (tiled and persistent/TMA kernels, under TRITON_INTERPRET=1 on CPU) against fp8_gemm_ref.

Both compute the same E4M3 products with fp32 accumulation; they differ only in summation order and in the
final rounding, so the floors are set by the output dtype: fp32 output >= 100 dB (about 2**-17 relative error,
accumulation order), bf16 output >= 45 dB (bf16 keeps 8 bits: ~53 dB for one rounding).
"""

import pytest
import torch

pytest.importorskip("triton")

from fewstep.kernels.fp8_gemm import (  # noqa: E402
    FP8_GEMM_CONFIGS,
    INTERPRETER_CONFIG,
    Fp8GemmConfig,
    candidate_configs,
    fp8_gemm,
    fp8_gemm_ref,
    heuristic_config,
    resolve_config,
)
from fewstep.kernels.quantize_fp8 import quantize_fp8_ref  # noqa: E402

from .fp8_util import activations, sqnr_db  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEV == "cpu"
TILED = INTERPRETER_CONFIG if ON_CPU else None
PERSISTENT = Fp8GemmConfig(16, 32, 32, 2, num_warps=4, num_stages=1, persistent=True) if ON_CPU else None
FLOOR = {torch.float32: 100.0, torch.bfloat16: 45.0}


def _operands(m, n, k, seed=0, per_tensor=False):
    x = activations(m, k, seed=seed).to(DEV)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.rand(n, k, generator=g) * 2 - 1) / k**0.5
    b = torch.randn(n, generator=g)
    if per_tensor:
        a_scale = torch.tensor([x.abs().max().item() / 448.0], device=DEV)
        a, _ = quantize_fp8_ref(x, a_scale)
    else:
        a, a_scale = quantize_fp8_ref(x)
    wq, ws = quantize_fp8_ref(w.to(DEV))
    return a, a_scale, wq, ws.reshape(-1).contiguous(), b.to(DEV)


@pytest.mark.parametrize("mnk", [(1, 16, 16), (37, 48, 80), (64, 96, 160), (5, 144, 1152)])
@pytest.mark.parametrize("activation", [None, "gelu_tanh", "gelu"])
@pytest.mark.parametrize("config", ["tiled", "persistent"])
def test_matches_reference(mnk, activation, config):
    a, sa, w, sw, b = _operands(*mnk, seed=sum(mnk))
    cfg = TILED if config == "tiled" else PERSISTENT
    for dtype in (torch.float32, torch.bfloat16):
        out = fp8_gemm(a, sa, w, sw, b, activation=activation, out_dtype=dtype, config=cfg)
        ref = fp8_gemm_ref(a, sa, w, sw, b, activation=activation, out_dtype=torch.float32)
        assert out.dtype == dtype and out.shape == (mnk[0], mnk[1])
        assert sqnr_db(out, ref) >= FLOOR[dtype], (dtype, sqnr_db(out, ref))


@pytest.mark.parametrize("bias", [True, False])
def test_per_tensor_scale_and_no_bias(bias):
    a, sa, w, sw, b = _operands(19, 32, 64, seed=7, per_tensor=True)
    b = b if bias else None
    out = fp8_gemm(a, sa, w, sw, b, out_dtype=torch.float32, config=TILED)
    ref = fp8_gemm_ref(a, sa, w, sw, b, out_dtype=torch.float32)
    assert sqnr_db(out, ref) >= FLOOR[torch.float32]


def test_against_float64_of_the_unquantized_product():
    # end to end with quantization: the FP8 GEMM is a 25 dB+ approximation of the exact product
    x = activations(24, 256, seed=5).to(DEV)
    w = (torch.rand(64, 256) * 2 - 1).to(DEV) / 16
    a, sa = quantize_fp8_ref(x)
    wq, sw = quantize_fp8_ref(w)
    out = fp8_gemm(a, sa, wq, sw.reshape(-1).contiguous(), out_dtype=torch.bfloat16, config=TILED)
    exact = x.double() @ w.double().t()
    assert sqnr_db(out, exact) >= 25.0


@pytest.mark.parametrize("config", ["tiled", "persistent"])
def test_gated_residual_epilogue(config):
    m, n, k, batch = 40, 48, 64, 5  # 8 tokens per batch item
    a, sa, w, sw, b = _operands(m, n, k, seed=11)
    g = torch.Generator().manual_seed(12)
    residual = torch.randn(m, n, generator=g).to(DEV)
    gate = torch.randn(batch, 3 * n, generator=g).to(DEV)[:, n : 2 * n]  # a chunk: row stride 3n
    cfg = TILED if config == "tiled" else PERSISTENT
    out = fp8_gemm(a, sa, w, sw, b, out_dtype=torch.float32, config=cfg, residual=residual, gate=gate)
    y = fp8_gemm_ref(a, sa, w, sw, b, out_dtype=torch.float32)
    expect = residual + gate.repeat_interleave(m // batch, dim=0) * y
    assert sqnr_db(out, expect) >= FLOOR[torch.float32]
    ref = fp8_gemm_ref(a, sa, w, sw, b, out_dtype=torch.float32, residual=residual, gate=gate)
    assert sqnr_db(ref, expect) >= FLOOR[torch.float32]
    with pytest.raises(ValueError, match="go together"):
        fp8_gemm(a, sa, w, sw, residual=residual)
    with pytest.raises(ValueError, match="gate"):
        fp8_gemm(a, sa, w, sw, residual=residual, gate=gate[:3])


def test_out_buffer_and_empty():
    a, sa, w, sw, b = _operands(8, 32, 32)
    out = torch.empty(8, 32, dtype=torch.bfloat16, device=DEV)
    res = fp8_gemm(a, sa, w, sw, b, out=out, config=TILED)
    assert res is out
    e = fp8_gemm(a[:0], sa[:0], w, sw, b, config=TILED)
    assert e.shape == (0, 32)


def test_configs_are_data():
    cfg = heuristic_config(4096, 1152, 1152)
    assert Fp8GemmConfig(**cfg.to_dict()) == cfg
    assert resolve_config(8, 16, 16, "cpu") == INTERPRETER_CONFIG
    assert candidate_configs("cpu") == (INTERPRETER_CONFIG,)
    # every candidate fits an H100's 227 KB of shared memory per block; some fit Ada's 99 KB (no TMA)
    assert all(c.smem_bytes <= 227 * 1024 for c in FP8_GEMM_CONFIGS)
    assert any(c.smem_bytes <= 99 * 1024 and not c.persistent for c in FP8_GEMM_CONFIGS)
    for m in (16, 512, 8192):
        assert heuristic_config(m, 1152, 1152) in FP8_GEMM_CONFIGS


def test_bad_input():
    a, sa, w, sw, b = _operands(8, 32, 32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm(a.float(), sa, w, sw)
    with pytest.raises(ValueError, match="K differs"):
        fp8_gemm(a, sa, w[:, :16].contiguous(), sw)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_gemm(a, sa, w[:24].contiguous(), sw[:24].contiguous())
    with pytest.raises(ValueError, match="w_scale"):
        fp8_gemm(a, sa, w, sw[:5].contiguous())
    with pytest.raises(ValueError, match="activation"):
        fp8_gemm(a, sa, w, sw, activation="relu")
    with pytest.raises(ValueError, match="a_scale"):
        fp8_gemm(a, sa[:3].contiguous(), w, sw)
