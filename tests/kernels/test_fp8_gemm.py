"""fp8_gemm (tiled and persistent/TMA kernels, under TRITON_INTERPRET=1 on CPU) against fp8_gemm_ref.

Both compute the same E4M3 products; under the interpreter both accumulate in fp32 and differ only in
summation order and in the final rounding, so the floors are set by the output dtype: fp32 output >= 125 dB
(measured >= 140.6 dB: accumulation order only), bf16 output >= 45 dB (bf16 keeps 8 bits: ~53 dB for one
rounding).

On a GPU the fp32-output floor comes from the hardware instead: Hopper's FP8 MMA keeps about 13-14 mantissa
bits in its accumulator (and Triton enables that imprecise accumulation on sm_90), so the floor there is the
SQNR of a simulated 13-bit accumulation on the same operands less 6 dB (twice that error), at most 100 dB.
"""

import numpy as np
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
from fewstep.kernels.quantize_fp8 import (
    quantize_fp8_ref,  # noqa: E402
    triton_version,  # noqa: E402
)

from .fp8_util import activations, sqnr_db  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEV == "cpu"
# Triton <= 3.6's interpreter crashes in the FP8 GEMM's loops with numpy >= 2.4 (an interpreter bug fixed in
# later Triton); `make test-compat` runs these with numpy < 2.4
_NUMPY = tuple(int(x) for x in np.__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(DEV == "cpu" and triton_version() <= (3, 6) and _NUMPY >= (2, 4),
                                reason="Triton <= 3.6's interpreter crashes on the FP8 GEMM loops with numpy "
                                       ">= 2.4; use numpy < 2.4")
TILED = INTERPRETER_CONFIG if ON_CPU else None
PERSISTENT = Fp8GemmConfig(16, 32, 32, 2, num_warps=4, num_stages=1, persistent=True) if ON_CPU else None
# fp32 output under the interpreter: measured >= 140.6 dB over this file's cases; 125 dB = 5.6x that error
FLOOR = {torch.float32: 125.0 if ON_CPU else 100.0, torch.bfloat16: 45.0}
ACC_BITS = 13  # mantissa bits Hopper's FP8 accumulator keeps (the pessimistic end of 13-14)


def _round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Truncate float64 ``x`` to ``bits`` mantissa bits (toward zero, as the accumulator does)."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.trunc(m * 2.0**bits) / 2.0**bits, e)


def _low_precision_acc(a, sa, w, sw, k_step=32):
    """``(a @ w.T) * sa * sw`` with the running sum truncated to ACC_BITS after every k_step products."""
    af, wf = a.double().cpu(), w.double().cpu()
    acc = torch.zeros(af.shape[0], wf.shape[0], dtype=torch.float64)
    for k0 in range(0, af.shape[1], k_step):
        acc = _round_mantissa(acc + af[:, k0:k0 + k_step] @ wf[:, k0:k0 + k_step].t(), ACC_BITS)
    return acc * sa.double().cpu().reshape(-1, 1) * sw.double().cpu().reshape(1, -1)


def _floor(dtype, a, sa, w, sw) -> float:
    if ON_CPU or dtype != torch.float32:
        return FLOOR[dtype]
    exact = (a.double() @ w.double().t()).cpu() * sa.double().cpu().reshape(-1, 1) * sw.double().cpu()
    return min(FLOOR[dtype], sqnr_db(_low_precision_acc(a, sa, w, sw), exact) - 6.0)


def test_low_precision_accumulation_model_is_lossier():
    # the simulation behind the GPU floor: fewer accumulator bits, lower SQNR, well below fp32's
    a, sa, w, sw, _ = _operands(64, 96, 1152, seed=3)
    exact = (a.double() @ w.double().t()).cpu() * sa.double().cpu().reshape(-1, 1) * sw.double().cpu()
    db = sqnr_db(_low_precision_acc(a, sa, w, sw), exact)
    assert 50.0 < db < 100.0, db


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
        assert sqnr_db(out, ref) >= _floor(dtype, a, sa, w, sw), (dtype, sqnr_db(out, ref))


@pytest.mark.parametrize("bias", [True, False])
def test_per_tensor_scale_and_no_bias(bias):
    a, sa, w, sw, b = _operands(19, 32, 64, seed=7, per_tensor=True)
    b = b if bias else None
    out = fp8_gemm(a, sa, w, sw, b, out_dtype=torch.float32, config=TILED)
    ref = fp8_gemm_ref(a, sa, w, sw, b, out_dtype=torch.float32)
    assert sqnr_db(out, ref) >= _floor(torch.float32, a, sa, w, sw)


def test_against_float64_of_the_unquantized_product():
    # end to end with quantization: the FP8 GEMM is a 25 dB+ approximation of the exact product
    x = activations(24, 256, seed=5).to(DEV)
    w = (torch.rand(64, 256) * 2 - 1).to(DEV) / 16
    a, sa = quantize_fp8_ref(x)
    wq, sw = quantize_fp8_ref(w)
    out = fp8_gemm(a, sa, wq, sw.reshape(-1).contiguous(), out_dtype=torch.bfloat16, config=TILED)
    exact = x.double() @ w.double().t()
    assert sqnr_db(out, exact) >= 26.5  # measured 29.8 dB; 3 dB margin (2x noise power)


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
    assert sqnr_db(out, expect) >= _floor(torch.float32, a, sa, w, sw)
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


EPILOGUE_ARGS = {"plain": {}, "bias_gelu": {"activation": "gelu_tanh"}, "gated": {}}


@pytest.mark.skipif(ON_CPU, reason="every launch config on the hardware (the interpreter runs a small tile)")
@pytest.mark.parametrize("epilogue", list(EPILOGUE_ARGS))
@pytest.mark.parametrize("index", range(len(FP8_GEMM_CONFIGS)))
def test_every_config_at_large_m_on_cuda(index, epilogue):
    # M >= 128 and not a multiple of any tile, so every kernel (the persistent TMA one included) runs full
    # and partial tiles; N and K as DiT-XL/2's attention-out layer
    cfg = FP8_GEMM_CONFIGS[index]
    if cfg not in candidate_configs(DEV):
        pytest.skip(f"{cfg} does not fit this GPU")
    m, n, k, batch = 1040, 1152, 1152, 4
    a, sa, w, sw, b = _operands(m, n, k, seed=index)
    extra = dict(EPILOGUE_ARGS[epilogue])
    bias = None if epilogue == "plain" else b
    if epilogue == "gated":
        g = torch.Generator().manual_seed(index)
        extra["residual"] = torch.randn(m, n, generator=g).to(DEV, torch.bfloat16)
        extra["gate"] = torch.randn(batch, n, generator=g).to(DEV, torch.bfloat16)
    out = fp8_gemm(a, sa, w, sw, bias, out_dtype=torch.bfloat16, config=cfg, **extra)
    ref = fp8_gemm_ref(a, sa, w, sw, bias, out_dtype=torch.float32, **extra)
    assert sqnr_db(out, ref) >= FLOOR[torch.bfloat16], (cfg, epilogue, sqnr_db(out, ref))


def test_epilogue_configs():
    # the heuristic's large-M tile per epilogue (fp8_gemm.py records why) and its validation
    from fewstep.kernels.quantize_fp8 import triton_version

    big = FP8_GEMM_CONFIGS[0] if triton_version() >= (3, 9) else FP8_GEMM_CONFIGS[1]  # spills below 3.9
    assert heuristic_config(4096, 1152, 1152, epilogue="plain") == big
    assert heuristic_config(4096, 1152, 1152, epilogue="gated") == FP8_GEMM_CONFIGS[4]
    assert not heuristic_config(4096, 1152, 1152, epilogue="bias_gelu").block_n == 256
    assert resolve_config(4096, 1152, 1152, "cpu", epilogue="gated") == INTERPRETER_CONFIG
    with pytest.raises(ValueError, match="epilogue must be one of"):
        resolve_config(8, 16, 16, "cpu", epilogue="relu")


def test_tuner_skips_only_configs_that_do_not_fit(monkeypatch):
    # a candidate that does not fit (OutOfResources) is skipped; any other error (a CUDA error) propagates
    from triton.runtime.errors import OutOfResources

    import fewstep.kernels.fp8_gemm as G

    cands = (FP8_GEMM_CONFIGS[0], FP8_GEMM_CONFIGS[4])
    monkeypatch.setattr(G, "candidate_configs", lambda device: cands)
    monkeypatch.setattr(torch, "randn", lambda *s, device=None, dtype=None: torch.zeros(*s, dtype=dtype))
    monkeypatch.setattr(torch, "rand", lambda *s, device=None: torch.zeros(*s))
    monkeypatch.setattr(torch, "empty", lambda *s, dtype=None, device=None: torch.zeros(*s, dtype=dtype))

    def bench(fn, warmup, rep):
        fn()
        return 1.0

    monkeypatch.setattr("triton.testing.do_bench", bench)

    def gemm_big_does_not_fit(*args, config=None, **kw):
        if config is cands[0]:
            raise OutOfResources(300000, 232448, "shared memory")
        return None

    monkeypatch.setattr(G, "fp8_gemm", gemm_big_does_not_fit)
    assert G._tune(64, 32, 32, "cpu", "gated") == cands[1]

    def gemm_cuda_error(*args, config=None, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(G, "fp8_gemm", gemm_cuda_error)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        G._tune(64, 32, 32, "cpu", "plain")
