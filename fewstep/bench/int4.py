"""INT4 figures measurable without a GPU: memory of the quantized layers, per-layer SQNR (round-to-nearest vs
AWQ) on DiT-XL/2 layers fed by the real network's activations, and whole-network forward error.

GPU speed (W4A16 vs cuBLAS bf16, W4A8 vs the FP8 GEMM, the DiT-XL/2 forward vs FP8) is
:mod:`fewstep.bench.int4_speed`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .models import DIT_XL_2, SD15_UNET

__all__ = [
    "MemoryResult", "LayerSqnr", "ForwardError", "TorchaoSqnr", "int4_memory", "dit_layer_sqnr",
    "dit_layer_sqnr_vs_torchao", "forward_errors", "dit_forward_error", "unet_forward_error",
]


@dataclass(frozen=True)
class MemoryResult:
    model: str
    group_size: int
    layers: int  # layers that become INT4
    bf16_bytes: int  # their bf16 weights
    int4_bytes: int  # packed codes + bf16 scales
    model_bf16_bytes: int  # every parameter in bf16
    model_int4_bytes: int  # the same with the INT4 layers replaced

    @property
    def layer_ratio(self) -> float:
        return self.int4_bytes / self.bf16_bytes

    @property
    def model_ratio(self) -> float:
        return self.model_int4_bytes / self.model_bf16_bytes


def int4_memory(name: str, class_name: str, config: dict, group_size: int = 128) -> MemoryResult:
    """Count the bytes of ``diffusers.<class_name>(**config)`` built on the meta device (no weights), before
    and after INT4 quantization with the default skip list and the group size (symmetric, bf16 scales)."""
    import diffusers

    from ..quant.int4_linear import int4_weight_bytes
    from ..quant.quantize_model import DEFAULT_SKIP, _is_gemm_conv

    with torch.device("meta"):
        net = getattr(diffusers, class_name)(**config)
    total = sum(p.numel() for p in net.parameters()) * 2
    layers = bf16 = int4 = 0
    for n, m in net.named_modules():
        if isinstance(m, nn.Linear):
            k, o = m.in_features, m.out_features
        elif _is_gemm_conv(m):
            k, o = m.in_channels, m.out_channels
        else:
            continue
        if any(r.matches(n) for r in DEFAULT_SKIP) or k % group_size or k % 16 or o % 16:
            continue
        layers += 1
        bf16 += 2 * k * o
        int4 += int4_weight_bytes(o, k, group_size)
    return MemoryResult(name, group_size, layers, bf16, int4, total, total - bf16 + int4)


@dataclass(frozen=True)
class LayerSqnr:
    layer: str
    shape: tuple[int, int]  # (N, K)
    rtn_db: float
    awq_db: float

    @property
    def gain_db(self) -> float:
        return self.awq_db - self.rtn_db


def _sqnr(approx: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = approx.double(), exact.double()
    return float(10 * torch.log10(e.pow(2).mean() / (a - e).pow(2).mean().clamp_min(1e-300)))


def _dit(config: dict) -> nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(**config).eval().requires_grad_(False)


def _dit_inputs(config: dict, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    s, c = config["sample_size"], config["in_channels"]
    return dict(
        hidden_states=torch.randn(batch, c, s, s, generator=g),
        timestep=torch.linspace(50.0, 950.0, batch),
        class_labels=torch.arange(batch) % config["num_embeds_ada_norm"],
        return_dict=False,
    )


def _dit_layer_inputs(config: dict, blocks: tuple[int, ...], batch: int):
    """``(net, layer names, calibration stats, held-out stats)``: the inputs of four linear layers of each of
    ``blocks`` recorded from the network's own forward (calibration: noise seed 0; held-out: seed 1; both at
    timesteps 50..950)."""
    from ..quant.int4_calibrate import InputStats

    net = _dit(config)
    names = [f"transformer_blocks.{b}.{p}" for b in blocks
             for p in ("attn1.to_q", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")]
    sub = nn.ModuleDict({n.replace(".", "_"): net.get_submodule(n) for n in names})
    with torch.no_grad():
        with InputStats(sub, rows_per_call=256, max_rows=512) as cal:
            net(**_dit_inputs(config, batch, 0))
        with InputStats(sub, rows_per_call=512, max_rows=512) as held:
            net(**_dit_inputs(config, batch, 1))
    cal, held = cal.result(), held.result()
    key = {n: n.replace(".", "_") for n in names}
    return net, names, {n: cal[key[n]] for n in names}, {n: held[key[n]] for n in names}


def dit_layer_sqnr(
    config: dict | None = None, *, blocks: tuple[int, ...] = (0, 13, 27), group_size: int = 128,
    batch: int = 2,
) -> list[LayerSqnr]:
    """Per-layer output SQNR of W4A16 (group ``group_size``) on DiT-XL/2 (random weights, CPU, fp32): each
    layer's inputs are recorded from the network's own forward (calibration: timesteps 50..950; held-out:
    another noise and timesteps), the weights quantized round-to-nearest and with AWQ's search, and the
    layer's output compared with its fp32 output on the held-out inputs."""
    from ..quant.int4_calibrate import awq_search
    from ..quant.int4_linear import INT4Linear

    net, names, cal, held = _dit_layer_inputs(config or DIT_XL_2, blocks, batch)
    out = []
    for n in names:
        lin = net.get_submodule(n)
        x = held[n].rows
        want = lin(x)
        rtn = INT4Linear.from_linear(lin, group_size=group_size, backend="emulated")
        s, clip, _ = awq_search(lin.weight, cal[n], group_size)
        awq = INT4Linear.from_linear(lin, group_size=group_size, backend="emulated", input_scale=s, clip=clip)
        with torch.no_grad():
            out.append(LayerSqnr(n, tuple(lin.weight.shape), _sqnr(rtn(x), want), _sqnr(awq(x), want)))
    return out


@dataclass(frozen=True)
class TorchaoSqnr:
    """Per-layer W4A16 output SQNR (dB) of fewstep's INT4 weights and torchao's at the same group size."""

    layer: str
    shape: tuple[int, int]  # (N, K)
    rtn_db: float  # fewstep round-to-nearest, symmetric (the default)
    rtn_zp_db: float  # fewstep round-to-nearest with zero points
    awq_db: float  # fewstep calibrated (AWQ search), symmetric
    torchao_db: float  # torchao Int4WeightOnlyConfig, "tile_packed_to_4d" (tinygemm): asymmetric, float zero
    torchao_hqq_db: float  # the same with int4_choose_qparams_algorithm="hqq"


def _torchao_int4_weight(w: torch.Tensor, group_size: int, hqq: bool) -> torch.Tensor:
    """(N, K) bf16 weight -> its dequantized torchao INT4 weight-only version (bf16, as tinygemm's MMA reads
    it), from the quantization primitives ``Int4TilePackedTo4dTensor.from_hp`` calls (torchao 0.18,
    ``torchao/quantization/quantize_/workflows/int4/int4_tile_packed_to_4d_tensor.py``); that tensor itself
    needs a CUDA GPU."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _choose_qparams_and_quantize_affine_hqq,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    block = (1, group_size)
    if hqq:
        q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
            w, nbits=4, group_size=group_size, axis=1, compute_dtype=torch.bfloat16, device=str(w.device),
            verbose=False, raw_output=False)
        q = q.to(torch.int32)
    else:
        scale, zero = _choose_qparams_affine_tinygemm(
            w, MappingType.ASYMMETRIC, block, torch.int32, quant_min=0, quant_max=15,
            scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16)
        q = _quantize_affine_tinygemm(w, list(block), scale, zero, torch.int32, quant_min=0, quant_max=15)
    return _dequantize_affine_tinygemm(q, block, scale, zero, torch.int32, 0, 15, output_dtype=torch.bfloat16)


def dit_layer_sqnr_vs_torchao(
    config: dict | None = None, *, blocks: tuple[int, ...] = (0, 13, 27), group_size: int = 128,
    batch: int = 2,
) -> list[TorchaoSqnr]:
    """:func:`dit_layer_sqnr`'s layers and inputs, W4A16 as a bf16 GPU runs it: the weight rounded to bf16
    (the unquantized reference), bf16 scales, the dequantized weight and the activations in bf16, products
    summed in fp32; fewstep's round-to-nearest (with and without zero points) and AWQ against torchao's INT4
    weight-only quantization (tinygemm and HQQ parameters) at the same group size.  Needs ``torchao``."""
    from ..kernels.int4_gemm import dequantize_int4_ref, quantize_int4_ref
    from ..quant.int4_calibrate import awq_search

    net, names, cal, held = _dit_layer_inputs(config or DIT_XL_2, blocks, batch)
    bf = torch.bfloat16

    def ours(w, zp=False, s=None, clip=None):  # Q(w * s) in bf16: the layer computes (x / s) @ Q(w * s).T
        return dequantize_int4_ref(*quantize_int4_ref(w if s is None else w * s, group_size, zero_point=zp,
                                                      scale_dtype=bf, clip=clip)).to(bf).float()

    def sqnr(x, want, wq, s=None):
        xs = x if s is None else (x / s).to(bf).float()
        return _sqnr(xs @ wq.t(), want)

    out = []
    for n in names:
        w = net.get_submodule(n).weight.detach().to(bf)
        wf = w.float()
        x = held[n].rows.to(bf).float()
        want = x @ wf.t()
        s, clip, _ = awq_search(wf, cal[n], group_size, scale_dtype=bf)
        out.append(TorchaoSqnr(
            n, tuple(w.shape), sqnr(x, want, ours(wf)), sqnr(x, want, ours(wf, zp=True)),
            sqnr(x, want, ours(wf, s=s, clip=clip), s),
            sqnr(x, want, _torchao_int4_weight(w, group_size, False).float()),
            sqnr(x, want, _torchao_int4_weight(w, group_size, True).float())))
    return out


@dataclass(frozen=True)
class ForwardError:
    model: str
    mode: str  # "int4-emulated" (W4A16) or "w4a8-emulated"
    method: str  # "rtn" (round-to-nearest) or "awq" (calibrated)
    group_size: int
    layers: int  # INT4 GEMMs (fused q/k/v counted once)
    rel_error: float  # ||y_q - y|| / ||y|| over the whole output
    sqnr_db: float  # -20 log10(rel_error)


def forward_errors(name: str, build, inputs: dict, calib: list[dict], *, group_size: int = 128,
                   rows_per_call: int = 64) -> list[ForwardError]:
    """Whole-network relative error of INT4 (W4A16 and W4A8, PyTorch emulation, any device) against the
    unquantized forward of ``build()`` on ``inputs``; weights round-to-nearest and AWQ-calibrated on the
    layer inputs recorded over the ``calib`` calls (``rows_per_call`` rows per layer and call).

    The W4A8 rows reuse the W4A16 layers (the same packed weights, scales and AWQ factors: the search looks
    at the weights only) with the activations quantized per token to E4M3, so W4A8 - W4A16 is the FP8
    activations' share of the error."""
    from ..quant import InputStats, quantize, quantized_layers

    out = []
    with torch.no_grad():
        model = build()
        ref = model(**inputs)[0].double()
        with InputStats(model, rows_per_call=rows_per_call) as st:
            for c in calib:
                model(**c)
        stats = st.result()
        for method in ("rtn", "awq"):
            q = copy.deepcopy(model)
            quantize(q, "int4-emulated", group_size=group_size, act_stats=stats if method == "awq" else None)
            layers = quantized_layers(q)
            for mode, kind in (("int4-emulated", "w4a16"), ("w4a8-emulated", "w4a8")):
                for m in layers.values():
                    m.kind = kind
                y = q(**inputs)[0].double()
                rel = float((y - ref).norm() / ref.norm())
                out.append(ForwardError(name, mode, method, group_size, len(layers), rel,
                                        -20 * math.log10(max(rel, 1e-300))))
            del q
    return out


# calibration: one batch-1 call at each of 8 timesteps spread over [0, 1000) (a plan's eight network calls,
# with random latents in place of the sampler's); evaluation: two other latents at timesteps 250 and 750
CALIB_TIMESTEPS = tuple(float(t) for t in torch.linspace(999, 0, 9)[:-1].round())
EVAL_TIMESTEPS = (250.0, 750.0)


def _net(class_name: str, config: dict) -> nn.Module:
    import diffusers

    torch.manual_seed(0)
    return getattr(diffusers, class_name)(**config).eval().requires_grad_(False)


def dit_forward_error(config: dict | None = None, *, group_size: int = 128, rows_per_call: int = 64,
                      ) -> list[ForwardError]:
    """:func:`forward_errors` of DiT-XL/2 (random weights, fp32): 256 px (32x32 latents), batch 2."""
    config = config or DIT_XL_2
    s, c, classes = config["sample_size"], config["in_channels"], config["num_embeds_ada_norm"]

    def call(batch, seed, steps):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, c, s, s, generator=g), timestep=torch.tensor(steps),
                    class_labels=(torch.arange(batch) * 7 + seed) % classes, return_dict=False)

    calib = [call(1, 100 + i, [t]) for i, t in enumerate(CALIB_TIMESTEPS)]
    return forward_errors("DiT-XL/2", lambda: _net("DiTTransformer2DModel", config),
                          call(len(EVAL_TIMESTEPS), 1, list(EVAL_TIMESTEPS)), calib, group_size=group_size,
                          rows_per_call=rows_per_call)


def unet_forward_error(config: dict | None = None, *, latent: int = 64, group_size: int = 128,
                       rows_per_call: int = 64) -> list[ForwardError]:
    """:func:`forward_errors` of the SD1.5 UNet (random weights, fp32): ``latent`` x ``latent`` latents (64:
    512 px), 77 random text tokens, batch 2."""
    config = config or SD15_UNET
    c, d = config["in_channels"], config["cross_attention_dim"]

    def call(batch, seed, steps):
        g = torch.Generator().manual_seed(seed)
        return dict(sample=torch.randn(batch, c, latent, latent, generator=g), timestep=torch.tensor(steps),
                    encoder_hidden_states=torch.randn(batch, 77, d, generator=g), return_dict=False)

    calib = [call(1, 100 + i, [t]) for i, t in enumerate(CALIB_TIMESTEPS)]
    return forward_errors("SD1.5 UNet", lambda: _net("UNet2DConditionModel", config),
                          call(len(EVAL_TIMESTEPS), 1, list(EVAL_TIMESTEPS)), calib, group_size=group_size,
                          rows_per_call=rows_per_call)


def memory_table(group_sizes=(64, 128)) -> list[MemoryResult]:
    return [int4_memory(n, c, cfg, g) for g in group_sizes for n, c, cfg in (
        ("DiT-XL/2", "DiTTransformer2DModel", DIT_XL_2), ("SD1.5 UNet", "UNet2DConditionModel", SD15_UNET))]
