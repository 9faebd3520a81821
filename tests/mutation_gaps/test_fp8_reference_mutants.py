"""The plain-PyTorch references the FP8 kernels are tested against, checked on their own against float64 math
(gaps found by `make mutate`: a reference that drifts moves the kernel with it)."""

import pytest
import torch

from fewstep.kernels.adaln_quant import adaln_modulate_ref, adaln_quant_ref


def _inputs(b=2, t=3, d=40, spread=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows with a variance of ~spread^2 = 1e-6: the LayerNorm eps (1e-6) then changes the result by ~30%
    x = 1.0 + spread * torch.randn(b, t, d, generator=g)
    shift = torch.randn(b, d, generator=g)
    scale = torch.randn(b, d, generator=g)
    return x, shift, scale


def _modulate64(x, shift, scale, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm (Ba et al. 2016)
    y = (x - mean) / torch.sqrt(var + eps) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    return y.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("eps", [None, 1e-6, 1e-4])
def test_adaln_modulate_ref_layer_norm_eps(eps):
    x, shift, scale = _inputs()
    got = adaln_modulate_ref(x, shift, scale) if eps is None else adaln_modulate_ref(x, shift, scale, eps)
    want = _modulate64(x, shift, scale, 1e-6 if eps is None else eps)  # DiT's adaLN LayerNorm eps is 1e-6
    # fp32 LayerNorm of rows whose spread is 1e-3 of their mean: ~1e-4 relative cancellation error
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


def test_adaln_quant_ref_default_eps_is_1e_6():
    x, shift, scale = _inputs(seed=1)
    q, s = adaln_quant_ref(x, shift, scale)
    want = _modulate64(x, shift, scale, 1e-6)
    # dequantized FP8 (3 mantissa bits: relative step 2^-3) within one step of the float64 value
    err = (q.float().double() * s.double() - want).abs()
    assert torch.all(err <= 0.0625 * want.abs() + 1e-3 * want.abs().amax()), float(err.max())


@pytest.mark.parametrize("eps", [1e-5, 1e-4])
def test_adaln_quant_ref_passes_its_eps_on(eps):
    # rows of variance ~1e-6: LayerNorm's output at eps 1e-5 / 1e-4 is ~2.3x / ~7x smaller than at 1e-6
    x, shift, scale = _inputs(seed=2)
    q, s = adaln_quant_ref(x, shift, scale, eps)
    want = _modulate64(x, shift, scale, eps)
    # dequantized FP8 within one step of the float64 value, as in the default-eps test above (measured:
    # at most 0.87 of that bound; eps 1e-6 in place of the one given exceeds it 96x / 570x)
    err = (q.float().double() * s.double() - want).abs()
    assert torch.all(err <= 0.0625 * want.abs() + 1e-3 * want.abs().amax()), float(err.max())


@pytest.mark.parametrize("act_scale", [torch.ones(2), torch.ones(1, dtype=torch.float64), 1.0])
def test_adaln_quant_ref_checks_the_static_scale(act_scale):
    x, shift, scale = _inputs()
    with pytest.raises(ValueError, match="act_scale: expected a 1-element float32 tensor"):
        adaln_quant_ref(x, shift, scale, act_scale=act_scale)
