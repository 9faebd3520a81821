"""INT4Linear and the AWQ search: layers against float64 oracles, calibration against round-to-nearest.

The Triton layers run on the GPU when there is one (CPU tensors under the interpreter otherwise); there the
MMA's arithmetic (TF32 for fp32 activations, the FP8 accumulator) sets the floor against the emulation
(tests/kernels/int4_util.py).  The AWQ search is plain PyTorch and runs on the CPU.
"""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from fewstep.kernels.fp8_gemm import has_fp8_tensor_cores  # noqa: E402
from fewstep.kernels.int4_gemm import dequantize_int4_ref  # noqa: E402
from fewstep.kernels.quantize_fp8 import quantize_fp8_ref  # noqa: E402
from fewstep.quant import InputStats, INT4Conv1x1, INT4Linear, awq_search  # noqa: E402
from fewstep.quant.int4_linear import int4_weight_bytes  # noqa: E402

from ..kernels.fp8_util import activations, sqnr_db  # noqa: E402
from ..kernels.int4_util import floor_db, tf32, w4a8_accumulation  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEV == "cpu"
_CC = (0, 0) if ON_CPU else torch.cuda.get_device_capability()


def _linear(k, n, seed=0, bias=True, device="cpu"):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).requires_grad_(False).to(device)


def _skip_without_mma(kind):
    if not ON_CPU and _CC < (8, 0):
        pytest.skip("the INT4 GEMMs need bf16 tensor cores (compute capability 8.0+)")
    if kind == "w4a8" and not ON_CPU and not has_fp8_tensor_cores(DEV):
        pytest.skip("w4a8 needs FP8 tensor cores (compute capability 8.9+)")


@pytest.mark.parametrize("kind", ["w4a16", "w4a8"])
@pytest.mark.parametrize("zero_point", [False, True])
def test_layer_matches_its_dequantized_weight_and_the_emulation(kind, zero_point):
    _skip_without_mma(kind)
    lin = _linear(128, 48, device=DEV)
    x = activations(2 * 13, 128, seed=1).reshape(2, 13, 128).to(DEV)
    tri = INT4Linear.from_linear(lin, group_size=64, zero_point=zero_point, kind=kind, activation="gelu_tanh")
    emu = INT4Linear.from_linear(lin, group_size=64, zero_point=zero_point, kind=kind, activation="gelu_tanh",
                                 backend="emulated")
    assert tri.packed.shape == (48, 64) and tri.packed.dtype == torch.uint8
    w = dequantize_int4_ref(tri.packed, tri.scales, tri.zeros).double()
    want = torch.nn.functional.gelu(x.double() @ w.t() + lin.bias.double(), approximate="tanh")
    y, ye = tri(x), emu(x)
    assert y.shape == (2, 13, 48) and y.dtype == torch.float32
    floor = 40.0 if kind == "w4a16" else 25.0  # w4a8: E4M3 activations (3 mantissa bits) on top
    assert sqnr_db(y, want) > floor and sqnr_db(ye, want) > floor
    if ON_CPU:
        torch.testing.assert_close(y, ye, rtol=1e-4, atol=1e-4)
    else:  # the MMA's arithmetic modelled on the same operands, through the same GELU
        x2 = x.reshape(-1, 128)
        if kind == "w4a16":
            acc = tf32(x2) @ tf32(w).t()
        else:
            aq, sa = quantize_fp8_ref(x2)
            acc = w4a8_accumulation(aq, tri.packed, tri.scales, tri.zeros) * sa.double().cpu()
        model = torch.nn.functional.gelu(acc + lin.bias.double().cpu(), approximate="tanh").reshape(y.shape)
        assert sqnr_db(y, ye) >= floor_db(model, ye)
    # the weights themselves: 4-bit group-wise, ~20 dB against the float weights (uniform init)
    assert sqnr_db(w, lin.weight) > 18.0


def test_gated_residual_epilogue():
    _skip_without_mma("w4a16")
    lin = _linear(64, 32, bias=False, device=DEV)
    layer = INT4Linear.from_linear(lin, group_size=32)
    x, res, gate = (t.to(DEV) for t in (torch.randn(2, 5, 64), torch.randn(2, 5, 32), torch.randn(2, 32)))
    w = dequantize_int4_ref(layer.packed, layer.scales).double()
    want = res.double() + gate.double()[:, None, :] * (x.double() @ w.t())
    assert sqnr_db(layer(x, residual=res, gate=gate), want) > 40.0  # on a GPU: TF32, ~60 dB


def test_conv1x1_is_a_gemm_over_pixels():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 1).requires_grad_(False)
    layer = INT4Conv1x1.from_conv(conv, group_size=64, backend="emulated")
    x = torch.randn(2, 64, 3, 5)
    w = dequantize_int4_ref(layer.packed, layer.scales).double()
    want = torch.einsum("bchw,oc->bohw", x.double(), w) + conv.bias.double()[None, :, None, None]
    assert sqnr_db(layer(x), want) > 40.0


def test_bad_layers_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of the group size 128"):
        INT4Linear.from_linear(_linear(96, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        INT4Linear(64, 24, group_size=64)
    with pytest.raises(ValueError, match="kind"):
        INT4Linear(64, 32, group_size=64, kind="w4a4")
    with pytest.raises(ValueError, match="input has 32 features"):
        INT4Linear(64, 32, group_size=64)(torch.randn(3, 32))


def test_memory_is_under_0_3x_of_bf16():
    for n, k in ((1152, 1152), (4608, 1152), (1152, 4608), (320, 320)):
        for g in (64, 128):
            if k % g:
                continue
            layer = INT4Linear(k, n, group_size=g, bias=False, dtype=torch.bfloat16)
            held = sum(b.numel() * b.element_size() for b in layer.buffers())
            assert held == int4_weight_bytes(n, k, g)
            assert held <= 0.3 * (2 * n * k), (n, k, g, held / (2 * n * k))


def _outlier_layer(k=512, n=256, seed=0):
    """A layer and transformer-like inputs: a few channels 8x larger (tests/kernels/fp8_util.py)."""
    lin = _linear(k, n, seed)
    return lin, activations(1024, k, seed=seed + 1)


def test_awq_search_beats_round_to_nearest_on_outlier_activations():
    lin, x = _outlier_layer()
    with InputStats(lin, rows_per_call=256, max_rows=512) as st:
        lin(x[:512])
    stats = st.result()[""]
    assert stats.rows.shape == (256, 512)
    torch.testing.assert_close(stats.mean_abs, x[:512].abs().mean(0))  # mean |x| per channel
    s, clip, info = awq_search(lin.weight, stats, 128)
    assert s is not None and info["error"] < info["rtn_error"]
    rtn = INT4Linear.from_linear(lin, group_size=128, backend="emulated")
    awq = INT4Linear.from_linear(lin, group_size=128, backend="emulated", input_scale=s, clip=clip)
    held_out = x[512:]  # judged on inputs the search did not see
    want = lin(held_out).double()
    gain = sqnr_db(awq(held_out), want) - sqnr_db(rtn(held_out), want)
    assert gain >= 1.0, gain


def test_awq_search_keeps_round_to_nearest_when_nothing_helps():
    lin = _linear(128, 32)
    with InputStats(lin) as st:  # isotropic inputs: no channel matters more than another
        lin(torch.randn(64, 128))
    s, clip, info = awq_search(lin.weight, st.result()[""], 64, alphas=(0.0,), clips=(1.0,))
    assert s is None and clip is None and info["error"] == info["rtn_error"]


def test_input_stats_hooks_are_removed():
    lin = _linear(64, 32)
    with InputStats(lin) as st:
        lin(torch.randn(4, 64))
    lin(torch.randn(4, 64))
    assert st.result()[""].rows.shape[0] == 4 and not lin._forward_pre_hooks
