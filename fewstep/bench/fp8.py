"""FP8 benchmarks and quality measurements (``fewstep bench --quant fp8``, ``benchmarks/test_fp8.py``).

1. GEMM: :func:`~fewstep.kernels.fp8_gemm.fp8_gemm` (activations already quantized) vs ``torch._scaled_mm``
   (per-row scales, fast accumulation) vs cuBLAS bf16, on DiT-XL/2 shapes.
2. Producer + GEMM: LayerNorm + adaLN modulation + quantization fused into one kernel, then the FP8 GEMM, vs
   the bf16 producer (eager ops) + bf16 GEMM.
3. DiT-XL/2 forward at batch 16, replayed from a CUDA graph: bf16 vs FP8.
4. Quality (any device, emulated FP8 on CPU): relative error of one forward vs the unquantized network, per
   quant mode, on DiT-XL/2 and SD1.5-UNet configs with random weights; and the bundled digits model's samples.

Timings come from :mod:`fewstep.bench.timing` (medians); every result is a frozen dataclass; results files are
written only from GPU runs (:mod:`fewstep.bench.results`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.adaln_quant import adaln_quant
from ..kernels.fp8_gemm import fp8_gemm, resolve_config
from ..kernels.quantize_fp8 import quantize_fp8, quantize_fp8_ref
from .models import DIT_XL_2, SD15_UNET, random_model
from .sample import build_dit
from .timing import graph_median_ms, median_ms

__all__ = [
    "GemmResult",
    "ProducerResult",
    "ForwardResult",
    "QualityResult",
    "DigitsQuality",
    "bench_gemm",
    "bench_producer",
    "bench_dit_forward",
    "forward_quality",
    "dit_xl_2_quality",
    "sd15_unet_quality",
    "digits_quality",
    "DIT_XL_2_GEMMS",
    "GEMM_M",
    "SD15_UNET",
    "format_fp8_table",
]

# DiT-XL/2 linear layers (N, K): fused qkv, attention out, feed-forward in, feed-forward out
DIT_XL_2_GEMMS = ((3456, 1152), (1152, 1152), (4608, 1152), (1152, 4608))
# token counts: DiT-XL/2 at 256 px has 256 tokens per image, so batch 2 .. 32
GEMM_M = (512, 2048, 4096, 8192)


@dataclass(frozen=True)
class GemmResult:
    m: int
    n: int
    k: int
    fp8_us: float
    scaled_mm_us: float | None
    bf16_us: float | None
    config: str
    # the benchmarked kernel's output against torch._scaled_mm's on the same operands (None without CUDA):
    # both accumulate the same E4M3 products, so a wrong tile or epilogue shows as a low SQNR
    sqnr_vs_scaled_mm_db: float | None = None

    @property
    def tflops(self) -> float:
        return 2 * self.m * self.n * self.k / self.fp8_us / 1e6

    @property
    def vs_scaled_mm(self) -> float | None:
        """Speed relative to torch._scaled_mm (target >= 0.9)."""
        return self.scaled_mm_us / self.fp8_us if self.scaled_mm_us else None

    @property
    def vs_bf16(self) -> float | None:
        return self.bf16_us / self.fp8_us if self.bf16_us else None


@dataclass(frozen=True)
class ProducerResult:
    m: int
    d: int
    n: int
    fused_us: float  # adaln_quant + fp8_gemm
    bf16_us: float  # eager LayerNorm + modulation (bf16) + bf16 GEMM
    eager_quant_us: float  # eager bf16 producer + quantize_fp8 + fp8_gemm (unfused)

    @property
    def speedup(self) -> float:
        """Fused FP8 vs the bf16 producer + GEMM (target >= 1.25 at M >= 4096)."""
        return self.bf16_us / self.fused_us


@dataclass(frozen=True)
class ForwardResult:
    batch: int
    bf16_ms: float
    fp8_ms: float
    fp8_static_ms: float | None

    @property
    def ratio(self) -> float:
        """FP8 / bf16 forward time."""
        return self.fp8_ms / self.bf16_ms


@dataclass(frozen=True)
class QualityResult:
    model: str
    mode: str
    rel_error: float  # ||y_q - y|| / ||y|| of one forward
    sqnr_db: float
    reference_dtype: str


def _fp8_operands(m, n, k, device):
    g = torch.Generator(device="cpu").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device, torch.bfloat16)
    return x, w


def bench_gemm(m: int, n: int, k: int, device: torch.device, *, tune: bool = True) -> GemmResult:
    """FP8 GEMM (input already quantized, per-token x per-channel scales, bf16 out) vs _scaled_mm and bf16."""
    x, w = _fp8_operands(m, n, k, device)
    a, sa = quantize_fp8_ref(x)
    wq, sw = quantize_fp8_ref(w)
    sw = sw.reshape(-1).contiguous()
    cfg = resolve_config(m, n, k, device, tune=tune and device.type == "cuda")
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    fp8_ms = median_ms(lambda: fp8_gemm(a, sa, wq, sw, config=cfg, out=out), device)
    scaled = bf16 = sqnr = None
    if device.type == "cuda":
        wt, swr = wq.t(), sw.reshape(1, -1)  # column-major B, as _scaled_mm wants
        expect = torch._scaled_mm(a, wt, scale_a=sa, scale_b=swr, out_dtype=torch.bfloat16,
                                  use_fast_accum=True)
        fp8_gemm(a, sa, wq, sw, config=cfg, out=out)
        sqnr = _sqnr_db(out, expect)
        scaled = median_ms(
            lambda: torch._scaled_mm(
                a, wt, scale_a=sa, scale_b=swr, out_dtype=torch.bfloat16, use_fast_accum=True
            ),
            device,
        )
        bf16 = median_ms(lambda: F.linear(x, w), device)
    us = 1e3  # per ms
    return GemmResult(
        m, n, k, fp8_ms * us, scaled * us if scaled else None, bf16 * us if bf16 else None, str(cfg), sqnr
    )


def _sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """SQNR of ``approx`` against ``exact`` in dB (-inf when anything is not finite)."""
    a, e = approx.double(), exact.double()
    if not torch.isfinite(a).all():
        return -math.inf
    noise = float((a - e).pow(2).mean())
    return math.inf if noise == 0 else 10 * math.log10(float(e.pow(2).mean()) / noise)


def bench_producer(m: int, d: int, n: int, device: torch.device, *, tokens: int = 256) -> ProducerResult:
    """LayerNorm + adaLN modulation feeding a (d -> n) projection, over m = batch x tokens rows."""
    b = max(1, m // tokens)
    t = m // b
    g = torch.Generator(device="cpu").manual_seed(m + d)
    h = torch.randn(b, t, d, generator=g).to(device, torch.bfloat16)
    mod = torch.randn(b, 6 * d, generator=g).to(device, torch.bfloat16)
    shift, scale = mod.chunk(6, dim=1)[:2]
    w = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(device, torch.bfloat16)
    bias = torch.zeros(n, device=device, dtype=torch.bfloat16)
    wq, sw = quantize_fp8_ref(w)
    sw = sw.reshape(-1).contiguous()
    cfg = resolve_config(b * t, n, d, device, tune=device.type == "cuda")

    def bf16_path():
        y = F.layer_norm(h, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return F.linear(y, w, bias)

    def fused():
        q, s = adaln_quant(h, shift, scale, 1e-6)
        return fp8_gemm(q, s, wq, sw, bias, config=cfg)

    def eager_quant():
        y = F.layer_norm(h, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        q, s = quantize_fp8(y.reshape(-1, d))
        return fp8_gemm(q, s, wq, sw, bias, config=cfg)

    us = 1e3  # per ms
    return ProducerResult(
        b * t, d, n, median_ms(fused, device) * us, median_ms(bf16_path, device) * us,
        median_ms(eager_quant, device) * us,
    )


def dit_forward(config: dict, batch: int, device: torch.device, dtype: torch.dtype):
    """``forward(model)``: a no-argument call of ``model`` on one fixed DiT input (latents from seed 0,
    timestep 500, class labels 0, 1, ...), the input the forward benchmarks time and compare on."""
    s, c = config["sample_size"], config["in_channels"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, c, s, s, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)
    y = torch.arange(batch, device=device) % config["num_embeds_ada_norm"]

    def forward(model):
        return lambda: model(x, timestep=t, class_labels=y, return_dict=False)[0]

    return forward


def bench_dit_forward(batch: int, device: torch.device, *, config: dict | None = None,
                      static: bool = True) -> ForwardResult:
    """One DiT forward (DiT-XL/2 by default) replayed from a CUDA graph: bf16 vs FP8 (dynamic, and static
    scales)."""
    from ..quant import quantize, quantized_layers

    config = config or DIT_XL_2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mode = "fp8" if device.type == "cuda" else "fp8-emulated"
    forward = dit_forward(config, batch, device, dtype)

    with torch.no_grad():
        dit = build_dit(config, device, dtype)
        bf16 = graph_median_ms(forward(dit), device)
        q = copy.deepcopy(dit)  # quantized in place: the cached model stays unquantized
        quantize(q, mode, tune=device.type == "cuda")
        fp8 = graph_median_ms(forward(q), device)
        fp8_static = None
        if static:
            for lay in quantized_layers(q).values():  # timing only: any static scale runs the same kernels
                lay.set_act_scale(0.05)
            fp8_static = graph_median_ms(forward(q), device)
    return ForwardResult(batch, bf16, fp8, fp8_static)


def _rel(yq, y):
    yq, y = yq.double(), y.double()
    rel = float((yq - y).norm() / y.norm())
    return rel, -20 * math.log10(max(rel, 1e-300))


def forward_quality(
    name: str,
    build,
    inputs: dict,
    device: torch.device,
    *,
    modes=("dynamic", "static"),
    calib_inputs: list[dict] | None = None,
) -> list[QualityResult]:
    """Relative error of one forward of ``build()`` vs its unquantized self, per quant mode.

    build: () -> nn.Module in the reference dtype (bf16 on CUDA, fp32 on CPU); left unchanged (each mode
    quantizes a copy), so a cached model will do.  inputs: the forward's kwargs.
    modes: "dynamic" (per-token scales), "static" (per-tensor, absmax calibrated on ``calib_inputs``, default
    ``[inputs]``).  FP8 runs the Triton kernels on CUDA, the emulation elsewhere.
    """
    from ..quant import Calibrator, quantize

    quant = "fp8" if device.type == "cuda" else "fp8-emulated"
    results = []
    with torch.no_grad():
        model = build()
        ref = model(**inputs, return_dict=False)[0]
        ref_dtype = str(next(model.parameters()).dtype)
        for mode in modes:
            q = copy.deepcopy(model)
            quantize(q, quant)
            if mode == "static":
                with Calibrator(q, 1) as cal:
                    for kw in calib_inputs or [inputs]:
                        q(**kw, return_dict=False)
                cal.finish("max")
            out = q(**inputs, return_dict=False)[0]
            rel, db = _rel(out, ref)
            results.append(QualityResult(name, f"{quant} {mode}", rel, db, ref_dtype))
            del q
    return results


def format_fp8_table(gemms=(), producers=(), forwards=(), quality=()) -> str:
    lines = []
    if gemms:
        lines.append(
            f"{'fp8 gemm M x N x K':22s} {'fp8 us':>8s} {'TFLOP/s':>8s} {'_scaled_mm us':>14s} "
            f"{'vs _scaled_mm':>14s} {'bf16 us':>8s} {'vs bf16':>8s}  config"
        )
        for r in gemms:
            sm = f"{r.scaled_mm_us:14.1f}" if r.scaled_mm_us else f"{'-':>14s}"
            vs = f"{r.vs_scaled_mm:13.2f}x" if r.vs_scaled_mm else f"{'-':>14s}"
            bf = f"{r.bf16_us:8.1f}" if r.bf16_us else f"{'-':>8s}"
            vb = f"{r.vs_bf16:7.2f}x" if r.vs_bf16 else f"{'-':>8s}"
            lines.append(
                f"{f'{r.m} x {r.n} x {r.k}':22s} {r.fp8_us:8.1f} {r.tflops:8.1f} {sm} {vs} {bf} {vb}"
                f"  {r.config}"
            )
    if producers:
        lines.append(
            f"{'producer+gemm M x D->N':24s} {'fused us':>9s} {'bf16 us':>9s} {'speedup':>8s} "
            f"{'unfused fp8 us':>15s}"
        )
        for r in producers:
            lines.append(
                f"{f'{r.m} x {r.d}->{r.n}':24s} {r.fused_us:9.1f} {r.bf16_us:9.1f} {r.speedup:7.2f}x "
                f"{r.eager_quant_us:15.1f}"
            )
    if forwards:
        lines.append(
            f"{'DiT forward':12s} {'bf16 ms':>8s} {'fp8 ms':>8s} {'fp8/bf16':>9s} {'fp8 static ms':>14s}"
        )
        for r in forwards:
            st = f"{r.fp8_static_ms:14.2f}" if r.fp8_static_ms is not None else f"{'-':>14s}"
            lines.append(f"{f'batch {r.batch}':12s} {r.bf16_ms:8.2f} {r.fp8_ms:8.2f} {r.ratio:9.3f} {st}")
    if quality:
        lines.append(f"{'quality':14s} {'mode':22s} {'rel err':>9s} {'SQNR dB':>8s}  reference")
        for r in quality:
            lines.append(
                f"{r.model:14s} {r.mode:22s} {r.rel_error:9.4f} {r.sqnr_db:8.2f}  {r.reference_dtype}"
            )
    return "\n".join(lines)


def dit_xl_2_quality(
    device: torch.device, *, batch: int = 2, config: dict | None = None
) -> list[QualityResult]:
    """:func:`forward_quality` of DiT-XL/2 (random weights; ``config`` to scale it down)."""
    config = config or DIT_XL_2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(1)
    s, c = config["sample_size"], config["in_channels"]

    def inputs(seed):
        g.manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, c, s, s, generator=g).to(device, dtype),
            timestep=torch.linspace(50.0, 950.0, batch, device=device),
            class_labels=torch.arange(batch, device=device) % config["num_embeds_ada_norm"],
        )

    return forward_quality(
        "DiT-XL/2" if config is DIT_XL_2 else "DiT (scaled)",
        lambda: build_dit(config, device, dtype),
        inputs(0),
        device,
        calib_inputs=[inputs(1), inputs(2)],
    )


def sd15_unet_quality(
    device: torch.device, *, batch: int = 1, size: int = 64, config: dict | None = None
) -> list[QualityResult]:
    """:func:`forward_quality` of the SD1.5 UNet (random weights) on ``size`` x ``size`` latents."""
    config = config or SD15_UNET
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(2)

    def build():
        return random_model("UNet2DConditionModel", config, device, dtype)

    def inputs(seed):
        g.manual_seed(seed)
        return dict(
            sample=torch.randn(batch, config["in_channels"], size, size, generator=g).to(device, dtype),
            timestep=torch.tensor(500.0, device=device),
            encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=g).to(
                device, dtype
            ),
        )

    name = "SD1.5 UNet" if config is SD15_UNET else "UNet (scaled)"
    return forward_quality(f"{name} {size}px", build, inputs(0), device, calib_inputs=[inputs(1)])


@dataclass(frozen=True)
class DigitsQuality:
    """The bundled digits model: unquantized vs FP8 plans sampling from the same noise and labels."""

    quant: str
    activation_scales: str
    solver: str
    nfe: int
    guidance_scale: float
    n: int
    fd_ref: float  # Frechet distance to the real digits (classifier features)
    fd_fp8: float
    accuracy_ref: float  # class accuracy of the bundled classifier on the samples
    accuracy_fp8: float
    median_psnr_db: float  # FP8 sample vs unquantized sample from the same noise (range [-1, 1])

    @property
    def fd_change(self) -> float:
        return self.fd_fp8 / self.fd_ref - 1

    @property
    def accuracy_change(self) -> float:
        return self.accuracy_fp8 / self.accuracy_ref - 1


class _GuidedDigits:
    """The digits model as a plan network: builds the ``[null; labels]`` batch under guidance."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t, class_labels):
        if x.shape[0] == 2 * class_labels.shape[0]:
            class_labels = torch.cat([torch.full_like(class_labels, self.model.null_class), class_labels])
        return self.model(x, t, class_labels=class_labels)


def digits_quality(
    *,
    n: int = 500,
    solver: str = "unipc",
    nfe: int = 8,
    guidance_scale: float = 2.0,
    quant: str | None = None,
    activation_scales: str = "dynamic",
    seed: int = 0,
    device: torch.device | str | None = None,
) -> DigitsQuality:
    """FD, class accuracy and median PSNR of the FP8 plan vs the unquantized plan on the bundled digits model
    (``n`` samples, labels cycling 0..9, the same noise for both; defaults: ``fewstep demo``'s sampler).
    quant: "fp8" on CUDA, else "fp8-emulated"."""
    from .. import engine
    from ..models import class_accuracy, frechet_distance, load_digits_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quant = quant or ("fp8" if device.type == "cuda" else "fp8-emulated")
    labels = (torch.arange(n) % 10).to(device)
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)
    samples = {}
    for q in (None, quant):
        model, spec = load_digits_model()
        model = model.to(device)
        opts = {"activation_scales": activation_scales} if q else None
        plan = engine.compile(
            _GuidedDigits(model),
            spec,
            solver=solver,
            nfe=nfe,
            shape=tuple(noise.shape),
            guidance_scale=guidance_scale,
            device=device,
            cond={"class_labels": labels},
            quant=q,
            quant_options=opts,
        )
        samples[q] = plan(noise, class_labels=labels).clamp(-1, 1).cpu()
    ref, q8 = samples[None], samples[quant]
    mse = (q8 - ref).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    psnr = 10 * torch.log10(4.0 / mse)  # peak-to-peak range 2
    y = labels.cpu()
    return DigitsQuality(
        quant,
        activation_scales,
        solver,
        nfe,
        guidance_scale,
        n,
        frechet_distance(ref),
        frechet_distance(q8),
        class_accuracy(ref, y),
        class_accuracy(q8, y),
        float(psnr.median()),
    )
