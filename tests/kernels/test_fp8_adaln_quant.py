"""adaln_quant (LayerNorm + adaLN modulation + E4M3 quantization in one kernel) against adaln_quant_ref.

The kernel's LayerNorm sums in another order than torch's, so a few elements may round to a neighbouring E4M3
value: the check is the flash-attention rule in dB -- against the float64 modulated activations, the kernel's
dequantized output is at most 0.5 dB worse than the reference's -- plus matching per-token scales.
"""

import pytest
import torch

pytest.importorskip("triton")

from fewstep.kernels.adaln_quant import adaln_quant, adaln_quant_ref  # noqa: E402

from .fp8_util import sqnr_db  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, t, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, t, d, generator=g) * 3 + torch.randn(b, 1, d, generator=g)).to(dtype)
    mod = torch.randn(b, 6 * d, generator=g).to(dtype)  # the adaLN modulation output; shift/scale are chunks
    shift, scale = mod.chunk(6, dim=1)[:2]
    return x.to(DEV), shift.to(DEV), scale.to(DEV)


def _exact(x, shift, scale, eps):
    xd = x.double()
    mu = xd.mean(-1, keepdim=True)
    var = xd.var(-1, unbiased=False, keepdim=True)
    y = (xd - mu) / torch.sqrt(var + eps) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    return y.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("btd", [(1, 1, 16), (3, 16, 72), (2, 7, 1152), (5, 3, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(btd, dtype):
    x, shift, scale = _inputs(*btd, seed=sum(btd), dtype=dtype)
    q, s = adaln_quant(x, shift, scale, 1e-6)
    qr, sr = adaln_quant_ref(x, shift, scale, 1e-6)
    assert (
        q.shape == (btd[0] * btd[1], btd[2]) and q.dtype == torch.float8_e4m3fn and s.shape == (q.shape[0], 1)
    )
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    exact = _exact(x, shift, scale, 1e-6)
    k_db, r_db = sqnr_db(q.float() * s, exact), sqnr_db(qr.float() * sr, exact)
    assert k_db >= r_db - 0.5 and k_db >= 28.5, (k_db, r_db)  # measured 31.6-36.6 dB; 3 dB margin


def test_static_scale():
    x, shift, scale = _inputs(2, 8, 64, seed=4)
    act = torch.tensor([0.01], device=DEV)
    q, s = adaln_quant(x, shift, scale, 1e-5, act)
    qr, _ = adaln_quant_ref(x, shift, scale, 1e-5, act)
    assert s is act
    assert torch.isfinite(q.float()).all()
    assert (q.float() != qr.float()).float().mean() < 0.01  # neighbours at most, in rare elements
    assert sqnr_db(q.float(), qr.float()) >= 40.0


def test_bad_input():
    x, shift, scale = _inputs(2, 4, 32)
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        adaln_quant(x[0], shift, scale)
    with pytest.raises(ValueError, match="shift"):
        adaln_quant(x, shift[:1], scale)
    with pytest.raises(ValueError, match="act_scale"):
        adaln_quant(x, shift, scale, 1e-6, torch.ones(2, device=DEV))
