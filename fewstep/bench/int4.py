"""INT4 figures measurable without a GPU: memory of the quantized layers, per-layer SQNR (round-to-nearest vs
AWQ) on DiT-XL/2 layers fed by the real network's activations, and whole-network forward error.

GPU speed (W4A16 vs cuBLAS bf16, W4A8 vs the FP8 GEMM) is not measured here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .models import DIT_XL_2, SD15_UNET

__all__ = ["MemoryResult", "LayerSqnr", "int4_memory", "dit_layer_sqnr", "forward_error"]


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


def dit_layer_sqnr(
    config: dict | None = None, *, blocks: tuple[int, ...] = (0, 13, 27), group_size: int = 128,
    batch: int = 2,
) -> list[LayerSqnr]:
    """Per-layer output SQNR of W4A16 (group ``group_size``) on DiT-XL/2 (random weights, CPU, fp32): each
    layer's inputs are recorded from the network's own forward (calibration: timesteps 50..950; held-out:
    another noise and timesteps), the weights quantized round-to-nearest and with AWQ's search, and the
    layer's output compared with its fp32 output on the held-out inputs."""
    from ..quant.int4_calibrate import InputStats, awq_search
    from ..quant.int4_linear import INT4Linear

    config = config or DIT_XL_2
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
    out = []
    for n in names:
        key = n.replace(".", "_")
        lin = net.get_submodule(n)
        x = held[key].rows
        want = lin(x)
        rtn = INT4Linear.from_linear(lin, group_size=group_size, backend="emulated")
        s, clip, _ = awq_search(lin.weight, cal[key], group_size)
        awq = INT4Linear.from_linear(lin, group_size=group_size, backend="emulated", input_scale=s, clip=clip)
        with torch.no_grad():
            out.append(LayerSqnr(n, tuple(lin.weight.shape), _sqnr(rtn(x), want), _sqnr(awq(x), want)))
    return out


def forward_error(name: str, build, inputs: dict, mode: str = "int4-emulated", group_size: int = 128,
                  calib: dict | None = None) -> tuple[float, float]:
    """``(relative error, SQNR dB)`` of one forward of ``build()`` quantized with ``mode`` (AWQ on ``calib``
    inputs when given, else round-to-nearest) against the unquantized forward."""
    from ..quant import InputStats, quantize

    with torch.no_grad():
        model = build()
        ref = model(**inputs)[0]
        stats = None
        if calib is not None:
            with InputStats(model) as st:
                model(**calib)
            stats = st.result()
        q = copy.deepcopy(model)
        quantize(q, mode, group_size=group_size, act_stats=stats)
        y = q(**inputs)[0]
    rel = float((y.double() - ref.double()).norm() / ref.double().norm())
    return rel, -20 * math.log10(max(rel, 1e-300))


def memory_table(group_sizes=(64, 128)) -> list[MemoryResult]:
    return [int4_memory(n, c, cfg, g) for g in group_sizes for n, c, cfg in (
        ("DiT-XL/2", "DiTTransformer2DModel", DIT_XL_2), ("SD1.5 UNet", "UNet2DConditionModel", SD15_UNET))]
