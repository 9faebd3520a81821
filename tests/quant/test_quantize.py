"""fs.quantize and fs.compile(quant=...) on tiny diffusers networks (real architectures, random weights)."""

import logging

import pytest
import torch
from torch import nn

import fewstep as fs

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("triton")

from fewstep.quant import FP8DiTBlock, FP8Linear, quantized_layers  # noqa: E402

from ..kernels.fp8_util import sqnr_db  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EMU = "fp8-emulated"


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_embeds_ada_norm=10,
    )
    with torch.no_grad():  # adaLN-Zero gates start at zero: randomize so the blocks matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval().requires_grad_(False).to(DEV)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    m = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return m.eval().requires_grad_(False).to(DEV)


def _dit_inputs(b=3):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(b, 4, 8, 8, generator=g).to(DEV),
        torch.tensor([900.0, 500.0, 20.0][:b], device=DEV),
        torch.arange(b, device=DEV),
    )


def _dit_out(m, x, t, y):
    return m(x, timestep=t, class_labels=y, return_dict=False)[0]


def test_dit_default_skip_list_and_fusions():
    m = tiny_dit()
    report = fs.quantize(m, EMU)
    kept = dict(report.skipped)
    assert "proj_out_1" in kept and "proj_out_2" in kept
    assert (
        "transformer_blocks.0.norm1.linear" in kept and "adaLN" in kept["transformer_blocks.0.norm1.linear"]
    )
    assert any(".emb." in n for n in kept)
    assert not any(n.startswith("pos_embed") for n in report.quantized)
    assert report.fused_qkv == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert report.fused_blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    assert all(isinstance(b, FP8DiTBlock) for b in m.transformer_blocks)
    assert m.transformer_blocks[0].ff.net[0].activation == "gelu_tanh"
    assert len(quantized_layers(m)) == 8


@pytest.mark.parametrize("fuse", [True, False])
def test_dit_forward_close_to_unquantized(fuse):
    x, t, y = _dit_inputs()
    ref = _dit_out(tiny_dit(), x, t, y)
    m = tiny_dit()
    fs.quantize(m, EMU, fuse_qkv=fuse, fuse_blocks=fuse)
    out = _dit_out(m, x, t, y)
    assert sqnr_db(out, ref) >= 25.0
    assert any(isinstance(b, FP8DiTBlock) for b in m.transformer_blocks) == fuse


def test_dit_triton_kernels_match_emulation():
    x, t, y = _dit_inputs()
    a, b = tiny_dit(), tiny_dit()
    fs.quantize(a, "fp8")  # Triton kernels (the interpreter on CPU), fused producer
    fs.quantize(b, EMU)
    assert sqnr_db(_dit_out(a, x, t, y), _dit_out(b, x, t, y)) >= 40.0


def test_unet_1x1_convs_and_qkv():
    x = torch.randn(2, 4, 8, 8, device=DEV)
    ehs = torch.randn(2, 5, 32, device=DEV)
    t = torch.tensor([10.0, 700.0], device=DEV)
    ref = tiny_unet()(x, t, encoder_hidden_states=ehs).sample
    m = tiny_unet()
    report = fs.quantize(m, EMU)
    names = set(report.quantized)
    assert any(n.endswith("proj_in") for n in names) and any(n.endswith("conv_shortcut") for n in names)
    assert any(n.endswith("attn1.to_qkv") for n in names)  # self-attention fused
    assert any(n.endswith("attn2.to_kv") for n in names)  # cross-attention: k/v fused, q separate
    kept = dict(report.skipped)
    assert "conv_out" not in names and any(n.endswith("time_emb_proj") for n in kept)
    assert any("time_embedding" in n for n in kept)
    out = m(x, t, encoder_hidden_states=ehs).sample
    # ~20 FP8 layers in series (random weights, no trained structure): a 20 dB floor = 10% RMS error
    assert sqnr_db(out, ref) >= 20.0


def test_odd_sizes_fall_back_with_reason(caplog):
    net = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 20), nn.Linear(20, 32))
    with caplog.at_level(logging.INFO, logger="fewstep.quant"):
        report = fs.quantize(net, EMU)
    assert report.quantized == ["0"]
    assert dict(report.skipped) == {
        "2": "K=48 or N=20 is not a multiple of 16",
        "3": "K=20 or N=32 is not a multiple of 16",
    }
    assert "not a multiple of 16" in caplog.text
    assert isinstance(net[0], FP8Linear) and isinstance(net[2], nn.Linear)


def test_skip_rules_are_overridable():
    m = tiny_dit()
    report = fs.quantize(m, EMU, skip=(), extra_skip=("*ff.net.2",), fuse_blocks=False)
    assert "proj_out_2" in report.quantized and "transformer_blocks.0.norm1.linear" in report.quantized
    assert ("transformer_blocks.0.ff.net.2", "user skip rule") in report.skipped


def test_unknown_mode_lists_modes():
    with pytest.raises(ValueError, match="'fp8', 'fp8-emulated'"):
        fs.quantize(tiny_dit(), "int3")
    with pytest.raises(ValueError, match="'fp8', 'fp8-emulated'"):
        fs.compile(
            lambda x, t: x, fs.models.digits_spec(), solver="euler", nfe=2, shape=(1, 1, 4, 4), quant="fp9"
        )


def test_no_quantizable_layers_warns():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="no quantizable layers"):
        report = fs.quantize(net, EMU)
    assert report.quantized == []


def test_fp8_without_fp8_hardware_is_a_clear_error(monkeypatch):
    import fewstep.quant.quantize_model as qmod

    monkeypatch.setattr(qmod, "interpreting", lambda: False)
    if DEV == "cpu":
        with pytest.raises(RuntimeError, match="fp8-emulated"):
            fs.quantize(tiny_dit(), "fp8")
    else:
        monkeypatch.setattr(qmod, "has_fp8_tensor_cores", lambda d: False)
        with pytest.raises(RuntimeError, match="compute capability 8.9"):
            fs.quantize(tiny_dit(), "fp8")
