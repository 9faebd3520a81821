"""``fs.quantize(model, "fp8" | "int4" | "w4a8" | ...)``: swap a network's linear layers for FP8 or INT4 ones.

What is quantized: every ``nn.Linear`` and every 1x1 ``nn.Conv2d`` (stride 1, ungrouped: a GEMM over pixels),
except

* layers matched by a skip rule (:data:`DEFAULT_SKIP`: embedders, adaLN modulation, patch embedding, final
  layer; data, overridable), matched with ``fnmatch`` against the layer's name relative to the diffusers model
  inside any wrapper (``transformer_blocks.0.attn1.to_q``, not ``dit.transformer_blocks...``);
* layers whose K (in features) or N (out features) is not a multiple of 16 (FP8 MMA / 16-byte rows), or (INT4)
  whose K is not a multiple of the group size: they stay in their dtype and the reason is logged
  (``logging.getLogger("fewstep.quant")``) and reported.

INT4 modes (:class:`~fewstep.quant.int4_linear.INT4Linear`, group-wise weights): "int4" (W4A16 Triton GEMM),
"w4a8" (INT4 weights, per-token FP8 activations, FP8 tensor cores), and their PyTorch emulations
"int4-emulated" / "w4a8-emulated".  Weights are rounded to nearest, or with ``act_stats`` (inputs recorded by
:class:`~fewstep.quant.int4_calibrate.InputStats`) scaled and clipped as AWQ's search finds best.

Structure changes where the module allows it: separate q/k/v projections of a self-attention with diffusers'
default processor become one GEMM, and k/v of a cross-attention (``Attention.fuse_projections`` +
``FusedAttnProcessor2_0``); a diffusers
``GELU`` activation (Linear + GELU) becomes one FP8 GEMM with GELU in the epilogue; an adaLN-Zero DiT block
becomes :class:`~fewstep.quant.dit_block.FP8DiTBlock` (LayerNorm + modulation + quantization in one kernel).
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels.fp8_gemm import has_fp8_tensor_cores
from ..kernels.quantize_fp8 import interpreting
from .dit_block import FP8DiTBlock, dit_block_fusable
from .fp8_linear import FP8Conv1x1, FP8Linear
from .int4_calibrate import awq_search
from .int4_linear import INT4Conv1x1, INT4Linear

__all__ = [
    "quantize",
    "QuantReport",
    "SkipRule",
    "DEFAULT_SKIP",
    "QUANT_MODES",
    "INT4_MODES",
    "check_mode",
    "find_network",
    "quantized_layers",
]

log = logging.getLogger("fewstep.quant")

# INT4 mode -> (INT4Linear kind, backend)
INT4_MODES = {
    "int4": ("w4a16", "triton"),
    "int4-emulated": ("w4a16", "emulated"),
    "w4a8": ("w4a8", "triton"),
    "w4a8-emulated": ("w4a8", "emulated"),
}
# mode -> layer backend
QUANT_MODES = {"fp8": "triton", "fp8-emulated": "emulated", **{m: b for m, (_, b) in INT4_MODES.items()}}


@dataclass(frozen=True)
class SkipRule:
    """Layers whose name (relative to the diffusers model) matches ``pattern`` (fnmatch) stay unquantized."""

    pattern: str
    reason: str

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


DEFAULT_SKIP: tuple[SkipRule, ...] = (
    SkipRule("pos_embed.*", "patch embedding"),
    SkipRule("x_embedder*", "patch embedding"),
    SkipRule("conv_in", "input convolution (patch embedding)"),
    SkipRule("*.emb.*", "timestep / class embedder"),
    SkipRule("*time_embedding*", "timestep embedder"),
    SkipRule("*time_text_embed*", "timestep / text embedder"),
    SkipRule("*timestep_embedder*", "timestep embedder"),
    SkipRule("*class_embedding*", "class embedder"),
    SkipRule("*add_embedding*", "added-conditions embedder"),
    SkipRule("*context_embedder*", "text embedder"),
    SkipRule("*caption_projection*", "text embedder"),
    SkipRule("adaln_single.*", "timestep embedder / adaLN modulation"),
    SkipRule("*time_emb_proj", "timestep modulation of a ResNet block"),
    SkipRule("*norm*.linear", "adaLN modulation"),
    SkipRule("*norm*.linear_1", "adaLN modulation"),
    SkipRule("proj_out_1", "final layer (adaLN modulation)"),
    SkipRule("proj_out_2", "final layer"),
    SkipRule("proj_out", "final layer"),
    SkipRule("conv_out", "final layer"),
)


@dataclass
class QuantReport:
    """What :func:`quantize` did: layer names (relative to the model passed in), why layers were kept."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fused_qkv: list[str] = field(default_factory=list)
    fused_blocks: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # the structure keywords quantize() ran with (restore_state)
    # INT4 with act_stats: per layer, awq_search's info (alpha, output error before / after)
    calibration: dict = field(default_factory=dict)

    def __str__(self) -> str:
        kind = "INT4" if self.mode in INT4_MODES else "FP8"
        lines = [
            f"quant={self.mode}: {len(self.quantized)} {kind} layers, {len(self.skipped)} kept, "
            f"{len(self.fused_qkv)} fused q/k/v, {len(self.fused_blocks)} fused DiT blocks"
        ]
        lines += [f"  kept {n}: {r}" for n, r in self.skipped]
        return "\n".join(lines)


def check_mode(mode) -> str:
    """The FP8Linear backend of a quant mode; unknown modes raise ValueError listing the known ones."""
    if mode not in QUANT_MODES:
        raise ValueError(
            f"unknown quant mode {mode!r}; known modes: {', '.join(map(repr, QUANT_MODES))} (or None)"
        )
    return QUANT_MODES[mode]


def find_network(model) -> nn.Module | None:
    """The ``nn.Module`` behind a callable: the model itself, or an adapter's ``.model`` / ``.module``."""
    if isinstance(model, nn.Module):
        return model
    for attr in ("model", "module", "dit", "network"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Module):
            return m
    return None


def quantized_layers(model: nn.Module) -> dict[str, FP8Linear | INT4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (FP8Linear, INT4Linear))}


def _core_prefix(net: nn.Module) -> str:
    """Name prefix of the diffusers model inside ``net`` (skip rules match names relative to it)."""
    for name, m in net.named_modules():
        if hasattr(m, "config") and hasattr(m, "save_pretrained"):  # a diffusers ModelMixin
            return name + "." if name else ""
    return ""


def _device_backend(mode: str, net: nn.Module) -> str:
    backend = check_mode(mode)
    p = next(iter(net.parameters()), None)
    if mode in ("int4", "w4a8") and p is not None:
        dev = p.device
        if mode == "w4a8" and dev.type == "cuda" and not has_fp8_tensor_cores(dev):
            raise RuntimeError(
                f"quant='w4a8' needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                f"{torch.cuda.get_device_name(dev)} has "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(dev)))}. Pass quant='int4' (INT4 "
                f"weights, 16-bit activations) or quant='w4a8-emulated' (the same numerics with PyTorch ops)"
            )
        if mode == "int4" and dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 0):
            raise RuntimeError(
                f"quant='int4' needs bf16 tensor cores (compute capability 8.0+); "
                f"{torch.cuda.get_device_name(dev)} is older. Pass quant='int4-emulated'"
            )
        if dev.type == "cpu" and not interpreting():
            raise RuntimeError(
                f"quant={mode!r} runs Triton INT4 kernels on a CUDA GPU; the model is on the CPU. Pass "
                f"quant='{mode}-emulated' to run the same numerics with PyTorch ops"
            )
        return backend
    if backend == "triton" and p is not None:
        dev = p.device
        if dev.type == "cuda" and not has_fp8_tensor_cores(dev):
            raise RuntimeError(
                f"quant='fp8' needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                f"{torch.cuda.get_device_name(dev)} has "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(dev)))}. Pass "
                f"quant='fp8-emulated' to run the same FP8 numerics with PyTorch ops (slow)"
            )
        if dev.type == "cpu" and not interpreting():
            raise RuntimeError(
                "quant='fp8' runs Triton FP8 kernels on a CUDA GPU with FP8 tensor cores; the "
                "model is on the CPU. Pass quant='fp8-emulated' to emulate FP8 with PyTorch ops"
            )
    return backend


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, last = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, last, new)


def _is_gemm_conv(m: nn.Module) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped Conv2d: a GEMM over pixels."""
    return (
        isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.groups == 1
        and m.padding in ((0, 0), "valid")
        and m.dilation == (1, 1)
    )


def _fp8_replacement(name: str, m: nn.Module, backend: str, int4=None):
    """``(layer name, K, N, make)`` if ``m`` can become an FP8 layer (an INT4 one when ``int4`` is
    ``_int4_maker(...)``), else None.  A diffusers ``GELU`` (Linear + GELU) becomes one layer with GELU in
    the epilogue; its name is that of the Linear."""
    if type(m).__name__ == "GELU" and isinstance(getattr(m, "proj", None), nn.Linear):
        act = "gelu_tanh" if getattr(m, "approximate", "none") == "tanh" else "gelu"
        what = f"{name}.proj"
        if int4 is not None:
            return what, m.proj.in_features, m.proj.out_features, lambda: int4(what, m.proj, act)
        return (
            what,
            m.proj.in_features,
            m.proj.out_features,
            lambda: FP8Linear.from_linear(m.proj, activation=act, backend=backend),
        )
    if isinstance(m, nn.Linear):
        if int4 is not None:
            return name, m.in_features, m.out_features, lambda: int4(name, m, None)
        return name, m.in_features, m.out_features, lambda: FP8Linear.from_linear(m, backend=backend)
    if _is_gemm_conv(m):
        if int4 is not None:
            return name, m.in_channels, m.out_channels, lambda: int4(name, m, None)
        return name, m.in_channels, m.out_channels, lambda: FP8Conv1x1.from_conv(m, backend=backend)
    return None


def _int4_maker(mode: str, group_size: int, zero_point: bool, act_stats, report: QuantReport):
    """``make(name, layer, activation)`` -> INT4Linear / INT4Conv1x1, AWQ-searched where ``act_stats`` has
    the layer's inputs (a fused q/k/v projection reads the inputs recorded for its ``to_q`` / ``to_k``)."""
    kind, backend = INT4_MODES[mode]

    def make(name: str, layer: nn.Module, act: str | None):
        stats = None
        if act_stats:
            head, _, last = name.rpartition(".")
            alias = {"to_qkv": "to_q", "to_kv": "to_k"}.get(last)
            stats = act_stats.get(name) or (act_stats.get(f"{head}.{alias}") if alias else None)
        s = clip = None
        if stats is not None:
            w = layer.weight.reshape(layer.weight.shape[0], -1)
            half = layer.weight.dtype in (torch.bfloat16, torch.float16)
            sd = layer.weight.dtype if half else torch.float32
            s, clip, info = awq_search(w, stats, group_size, zero_point=zero_point, scale_dtype=sd)
            report.calibration[name] = info
        kw = dict(group_size=group_size, zero_point=zero_point, kind=kind, backend=backend, input_scale=s,
                  clip=clip)
        if isinstance(layer, nn.Conv2d):
            return INT4Conv1x1.from_conv(layer, **kw)
        return INT4Linear.from_linear(layer, activation=act, **kw)

    return make


def _fuse_qkv(net: nn.Module, skip_reason, report: QuantReport) -> None:
    """Self-attention q/k/v (cross-attention k/v) of a default-processor diffusers Attention -> one GEMM."""
    for name, m in list(net.named_modules()):
        if (
            type(m).__name__ != "Attention"
            or type(getattr(m, "processor", None)).__name__ != "AttnProcessor2_0"
        ):
            continue
        if any(getattr(m, p, None) is None for p in ("to_q", "to_k", "to_v")):
            continue
        fused = ("to_k", "to_v") if m.is_cross_attention else ("to_q", "to_k", "to_v")
        if any(
            skip_reason(f"{name}.{p}", getattr(m, p).in_features, getattr(m, p).out_features) for p in fused
        ):
            continue
        from diffusers.models.attention_processor import FusedAttnProcessor2_0

        with torch.no_grad():
            m.fuse_projections()
        m.set_processor(FusedAttnProcessor2_0())
        for p in fused:  # replaced by to_qkv (self-attention) or to_kv (cross-attention)
            setattr(m, p, None)
        report.fused_qkv.append(name)


def _fuse_dit_blocks(net: nn.Module, names: list[str], report: QuantReport) -> None:
    """Blocks that were fusable before layer replacement and now have all four FP8 projections."""
    for name in names:
        m = net.get_submodule(name)
        layers = (getattr(m.attn1, "to_qkv", None), m.attn1.to_out[0], m.ff.net[0], m.ff.net[2])
        if all(isinstance(x, FP8Linear) for x in layers) and layers[2].activation == "gelu_tanh":
            _set(net, name, FP8DiTBlock(m, *layers))
            report.fused_blocks.append(name)


def quantize(
    model,
    mode: str = "fp8",
    *,
    skip: tuple[SkipRule, ...] | None = None,
    extra_skip: tuple[SkipRule | str, ...] = (),
    fuse_qkv: bool = True,
    fuse_blocks: bool = True,
    tune: bool = False,
    group_size: int = 128,
    zero_point: bool = False,
    act_stats: dict | None = None,
) -> QuantReport:
    """Replace ``model``'s linear layers by :class:`FP8Linear` in place; returns a :class:`QuantReport`.

    mode: "fp8" (Triton kernels, CUDA sm_89+) or "fp8-emulated" (the same numerics with PyTorch ops, any
    device).  skip: the skip rules (default :data:`DEFAULT_SKIP`); extra_skip: more rules, or plain patterns.
    fuse_qkv / fuse_blocks: the structure changes in the module docstring.  tune: time the GEMM launch configs
    on the GPU when each layer first runs (the plan build), instead of the size heuristic.  Activations start
    dynamic (per token); a :class:`~fewstep.quant.Calibrator` makes them static.  A model without quantizable
    layers gives a warning and is left as is.

    INT4 modes ("int4", "w4a8", "int4-emulated", "w4a8-emulated"): :class:`INT4Linear` layers with
    ``group_size`` (64 or 128; 32 and 256 allowed) and, with ``zero_point``, asymmetric groups; ``act_stats``
    (``InputStats(...).result()`` of the unquantized network) turns on AWQ's scale and clip search.  There
    is no DiT block fusion for INT4 (the fused block quantizes its activations to FP8 for FP8 weights).
    """
    net = find_network(model)
    options = dict(
        skip=skip, extra_skip=tuple(extra_skip), fuse_qkv=fuse_qkv, fuse_blocks=fuse_blocks, tune=tune
    )
    if mode in INT4_MODES:
        from ..kernels.int4_gemm import GROUP_SIZES

        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
        options.update(group_size=group_size, zero_point=bool(zero_point))
    report = QuantReport(mode=mode, options=options)
    if net is None:
        check_mode(mode)
        warnings.warn(
            f"quant={mode!r}: {type(model).__name__} holds no torch.nn.Module; nothing to quantize, "
            f"running unquantized",
            stacklevel=2,
        )
        return report
    if getattr(net, "_fewstep_quant", None) is not None:
        raise ValueError(f"{type(net).__name__} is already quantized (quant={net._fewstep_quant.mode!r})")
    backend = _device_backend(mode, net)
    rules = tuple(DEFAULT_SKIP if skip is None else skip)
    rules += tuple(r if isinstance(r, SkipRule) else SkipRule(str(r), "user skip rule") for r in extra_skip)
    core = _core_prefix(net)

    int4 = _int4_maker(mode, group_size, zero_point, act_stats, report) if mode in INT4_MODES else None

    def skip_reason(name: str, k: int, n: int) -> str | None:
        rel = name[len(core) :] if core and name.startswith(core) else name
        reason = next((r.reason for r in rules if r.matches(rel)), None)
        if reason is None and int4 is not None and k % group_size:
            reason = f"K={k} is not a multiple of the INT4 group size {group_size}"
        return reason or (f"K={k} or N={n} is not a multiple of 16" if k % 16 or n % 16 else None)

    if fuse_qkv:
        _fuse_qkv(net, skip_reason, report)
    blocks = [n for n, m in net.named_modules() if fuse_blocks and dit_block_fusable(m) is None]
    handled: set[str] = set()  # a GELU's Linear is replaced together with it
    for name, m in list(net.named_modules()):
        rep = None if name in handled else _fp8_replacement(name, m, backend, int4)
        if rep is None:
            continue
        what, k, n, make = rep
        handled.add(what)
        reason = skip_reason(what, k, n)
        if reason:
            report.skipped.append((what, reason))
            log.info("%s stays unquantized: %s", what, reason)
            continue
        with torch.no_grad():
            _set(net, name, make())
        report.quantized.append(name)
    _fuse_dit_blocks(net, blocks, report)

    for m in quantized_layers(net).values():
        m.tune = tune
    if not report.quantized:
        warnings.warn(
            f"quant={mode!r}: no quantizable layers in {type(net).__name__} "
            f"({len(report.skipped)} kept by skip rules or shape); running unquantized",
            stacklevel=2,
        )
    net._fewstep_quant = report
    return report
