"""quantize_fp8 (under TRITON_INTERPRET=1 on CPU) against quantize_fp8_ref: identical E4M3 bits and scales."""

import pytest
import torch

pytest.importorskip("triton")

from fewstep.kernels.quantize_fp8 import E4M3_MAX, quantize_fp8, quantize_fp8_ref  # noqa: E402

from .fp8_util import activations, sqnr_db  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 16), (7, 80), (33, 72), (4, 1152)]


def _bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_matches_reference(shape, dtype):
    x = activations(*shape, seed=shape[0], dtype=dtype).to(DEV)
    q, s = quantize_fp8(x)
    qr, sr = quantize_fp8_ref(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (shape[0], 1)
    assert torch.equal(s, sr)
    assert torch.equal(_bits(q), _bits(qr))
    # each row uses the full E4M3 range, and dequantization is accurate
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((shape[0],), E4M3_MAX, device=DEV))
    assert sqnr_db(q.float() * s, x.float()) >= 29.0  # measured 32.1-48.9 dB; 3 dB margin


def test_static_scale_saturates():
    x = activations(9, 64, seed=3).to(DEV)
    scale = torch.tensor([x.abs().max().item() / E4M3_MAX / 4], device=DEV)  # 4x too small: clips
    q, s = quantize_fp8(x, scale)
    qr, _ = quantize_fp8_ref(x, scale)
    assert s is scale
    assert torch.equal(_bits(q), _bits(qr))
    assert q.float().abs().max() == E4M3_MAX  # saturated, not NaN
    assert torch.isfinite(q.float()).all()


def test_round_to_nearest_even_and_carry():
    # values whose rounding carries into the next power of two (126 -> 128), ties, subnormals, zeros
    vals = [126.0, -126.0, 31.9, 0.0, 1.0625, 1.1875, 2.0**-9, 3 * 2.0**-10, -(2.0**-7), 448.0, 250.0]
    x = torch.tensor([vals + [0.0] * (16 - len(vals))], device=DEV)
    scale = torch.ones(1, device=DEV)
    q, _ = quantize_fp8(x, scale)
    assert torch.equal(_bits(q), _bits(x.float().to(torch.float8_e4m3fn)))


def test_zero_rows_and_empty():
    x = torch.zeros(3, 32, device=DEV)
    x[1] = activations(1, 32).to(DEV)
    q, s = quantize_fp8(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(q[0].float(), torch.zeros(32, device=DEV))
    q, s = quantize_fp8(torch.zeros(0, 32, device=DEV))
    assert q.shape == (0, 32) and s.shape == (0, 1)


def test_strided_rows():
    x = activations(6, 96).to(DEV)[:, :48]  # row stride 96, feature stride 1
    q, s = quantize_fp8(x)
    qr, sr = quantize_fp8_ref(x.contiguous())
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)


def test_bad_input():
    with pytest.raises(ValueError, match="2-d"):
        quantize_fp8(torch.randn(2, 3, 16, device=DEV))
    with pytest.raises(ValueError, match="float32"):
        quantize_fp8(torch.ones(2, 16, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="contiguous"):
        quantize_fp8(torch.randn(16, 4, device=DEV).t())
    with pytest.raises(ValueError, match="static per-tensor"):
        quantize_fp8(torch.randn(2, 16, device=DEV), torch.ones(2, device=DEV))
