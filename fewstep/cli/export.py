"""``fewstep export``: a whole sampler (every network call and solver update) as one ONNX file.

Bundled digits model: ``fewstep export --solver unipc --nfe 8 --guidance 2 --batch 10 --out digits.onnx``
(``class_labels`` is an input of the file: any labels at run time, ``--batch`` of them).

Local diffusers directory (as ``fewstep sample`` loads it: from disk, safetensors only): ``fewstep export
--diffusers DIR [--scheduler-config JSON] [--cond FILE] [--batch N] [--size S] --out plan.onnx``; text models
take ``--cond FILE`` (their conditioning tensors of one image by name, ``.safetensors`` or ``.npz``): they fix
the shapes and dtypes of the file's inputs.

``--dtype`` picks the network's dtype, ``--quant fp8-emulated`` (or ``fp8`` on an FP8 GPU) exports FP8
layers as QuantizeLinear / DequantizeLinear (``--activation-scales static`` for calibrated scales, what
TensorRT wants); ``--quant int4-emulated`` / ``w4a8-emulated`` (``int4`` / ``w4a8`` on a GPU that runs them)
exports INT4 weights as 4-bit initializers in a blocked DequantizeLinear (opset 21, the default for them),
w4a8 with per-token float8 Q/DQ of the activations (``--int4-method rtn`` skips AWQ calibration).  ``--trt``
then builds a TensorRT engine beside the file (``--engine PATH``); it needs the ``tensorrt`` package and says
so in one line if it is missing, before any work.  ``--verify`` runs the file on
onnxruntime and the torch plan on the same random inputs and prints their relative difference.

Run the file with ``fewstep sample --backend onnxruntime FILE`` or ``fs.load_onnx(FILE)``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .checks import device as check_device
from .checks import guidance_arg, guidance_or_none, int_at_least, positive_int_arg, writable_file

DTYPES = ("float32", "float16", "bfloat16")
QUANT = ("none", "fp8", "fp8-emulated", "int4", "int4-emulated", "w4a8", "w4a8-emulated")
OPSETS = (17, 21)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="plan.onnx", help="output ONNX file (default: plan.onnx)")
    p.add_argument("--solver", default="unipc", help="solver name (see `fewstep solvers`; default: unipc)")
    p.add_argument("--nfe", type=positive_int_arg, default=8, help="network calls (default: 8)")
    p.add_argument("--guidance", type=guidance_arg, default=2.0,
                   help="classifier-free guidance scale, >= 0; 0: off (default: 2)")
    p.add_argument("--spacing", default=None, help="timestep spacing (default: the solver's / config's)")
    p.add_argument("--batch", type=positive_int_arg, default=None,
                   help="images per call (default: 10 for the bundled model, 1 for --diffusers)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="network dtype (default: the model's)")
    p.add_argument("--quant", choices=QUANT, default="none",
                   help="FP8 / INT4 layers as Q/DQ (default: none)")
    p.add_argument("--activation-scales", choices=("static", "dynamic"), default="static",
                   help="with --quant fp8: calibrated per-tensor (static, default) or per-token (dynamic) "
                        "scales (w4a8 is always per token)")
    p.add_argument("--int4-method", choices=("awq", "rtn"), default="awq",
                   help="with --quant int4* / w4a8*: activation-aware calibration (awq, default) or "
                        "round-to-nearest weights (rtn, no calibration runs)")
    p.add_argument("--opset", type=int_at_least(17), default=None,
                   help="ONNX opset, 17..21 (default: 21 for INT4 plans, else 19)")
    p.add_argument("--diffusers", metavar="PATH", default=None,
                   help="a local diffusers pipeline or model dir")
    p.add_argument("--scheduler-config", metavar="JSON", default=None,
                   help="diffusers scheduler config for a bare model directory")
    p.add_argument("--cond", metavar="FILE", default=None,
                   help="example conditioning tensors for text models: .safetensors or .npz (never a pickle)")
    p.add_argument("--size", type=positive_int_arg, default=None,
                   help="latent height/width (default: the model's)")
    p.add_argument("--device", default="cpu", help="where the plan is built and traced (default: cpu)")
    p.add_argument("--trt", action="store_true", help="also build a TensorRT engine (needs tensorrt)")
    p.add_argument("--engine", metavar="PATH", default=None,
                   help="with --trt: the engine file (default: --out with suffix .engine)")
    p.add_argument("--verify", action="store_true",
                   help="compare the file on onnxruntime with the torch plan on one random input")


def run(args: argparse.Namespace) -> int:
    import fewstep as fs

    # every argument is checked here, before a model is loaded
    fs.solvers.get(args.solver)
    device = check_device(args.device)
    out = writable_file(args.out, "--out", suffixes=(".onnx",))
    engine = None
    if args.trt:
        from fewstep.export.trt import tensorrt_or_error

        tensorrt_or_error()
        engine = writable_file(args.engine or out.with_suffix(".engine"), "--engine")
    elif args.engine is not None:
        raise ValueError("--engine applies only with --trt")
    quant = None if args.quant == "none" else args.quant
    int4 = quant is not None and quant.startswith(("int4", "w4a8"))
    if args.opset is None:
        args.opset = 21 if int4 else 19
    if not OPSETS[0] <= args.opset <= OPSETS[1]:
        raise ValueError(f"--opset: expected {OPSETS[0]}..{OPSETS[1]}, got {args.opset}")
    if int4 and args.opset < 21:
        raise ValueError(f"--quant {quant} exports INT4 weights in a blocked DequantizeLinear: needs --opset "
                         f">= 21")
    if quant is not None and args.opset < 19:
        raise ValueError(f"--quant {quant} exports float8 QuantizeLinear / DequantizeLinear: needs --opset "
                         f">= 19")
    guidance = guidance_or_none(args.guidance)
    if args.diffusers is None:
        given = [f"--{k.replace('_', '-')}" for k in ("scheduler_config", "cond", "size")
                 if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only with --diffusers DIR (the bundled digits model takes "
                             f"--batch)")
    t0 = time.perf_counter()
    plan, cond = _bundled_plan(args, guidance, device, quant) if args.diffusers is None else \
        _diffusers_plan(args, guidance, device, quant)
    report = plan.export_onnx(out, opset=args.opset)
    inputs = ", ".join(f"{k} {tuple(s)} {d}" for k, (s, d) in report.inputs.items())
    print(f"wrote {out}: {plan.program.solver}, NFE {plan.nfe}, guidance {guidance or 0:g}, "
          f"{report.file_bytes / 1e6:.2f} MB ({report.size_ratio:.3f}x the network's "
          f"{report.network_bytes / 1e6:.2f} MB of weights), {report.nodes} nodes, exported in "
          f"{report.seconds:.1f} s "
          f"({time.perf_counter() - t0:.1f} s with the plan build); inputs: {inputs}; output: sample")
    if args.verify:
        print(f"verify: onnxruntime vs the torch plan, relative difference {_verify(plan, cond, out):.2e}")
    if engine is not None:
        from fewstep.export import build_engine

        t1 = time.perf_counter()
        build_engine(out, engine)
        print(f"wrote TensorRT engine {engine} in {time.perf_counter() - t1:.1f} s")
    return 0


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, name)


def _plan_kw(args, quant):
    """fs.compile keywords shared by both models: quantization, and noise recording for --verify."""
    kw = {"record_noise": bool(args.verify)}
    if quant is not None:  # INT4 layers quantize activations (w4a8) per token, whatever the option says
        kw.update(quant=quant, quant_options={"activation_scales": args.activation_scales}
                  if quant.startswith("fp8") else {"int4_method": args.int4_method})
    return kw


def _bundled_plan(args, guidance, device, quant):
    import torch

    import fewstep as fs
    from fewstep.models import digits

    batch = args.batch or 10
    fs.solvers.build(args.solver, digits.digits_spec(), args.nfe, args.spacing, guidance_scale=guidance)
    dit, _ = digits.load_digits_dit()
    model, spec = fs.models.from_diffusers(dit.to(device), digits.digits_scheduler_config())
    cond = {"class_labels": torch.arange(batch, device=device) % digits.NUM_CLASSES}  # examples: an input
    plan = fs.compile(model, spec, solver=args.solver, nfe=args.nfe, spacing=args.spacing,
                      shape=(batch, *digits.SAMPLE_SHAPE), guidance_scale=guidance, device=device, cond=cond,
                      dtype=_dtype(args.dtype), **_plan_kw(args, quant))
    return plan, cond


def _diffusers_plan(args, guidance, device, quant):
    import torch

    import fewstep as fs
    from fewstep.cli.diffusers_dir import latent_shape, pipeline_spacing
    from fewstep.cli.sample import _cond_suffix_message, _load_cond, _load_dir, _repeat_cond

    if args.cond is not None and Path(args.cond).suffix.lower() not in (".safetensors", ".npz"):
        raise ValueError(_cond_suffix_message(args.cond))
    cond_tensors = _load_cond(Path(args.cond)) if args.cond is not None else None
    net, sched_cfg, _ = _load_dir(Path(args.diffusers), args.scheduler_config, device)
    if args.dtype is not None:
        net = net.to(_dtype(args.dtype))
    model, spec = fs.models.from_diffusers(net, sched_cfg)
    cls = type(net).__name__
    batch = args.batch or 1
    if cls == "DiTTransformer2DModel":
        if cond_tensors is not None:
            raise ValueError(f"{cls} is class-conditional: its input is class_labels, not --cond")
        cond = {"class_labels": torch.zeros(batch, dtype=torch.int64, device=device)}
    else:
        if cond_tensors is None:
            raise ValueError(f"{cls} is text-conditioned: pass --cond FILE (.safetensors or .npz) with "
                             "example conditioning tensors (they fix the file's input shapes)")
        cond = _repeat_cond(cond_tensors, batch, args.cond, device)
    shape = latent_shape(net, batch, args.size)
    spacing = pipeline_spacing(model, args.spacing, args.nfe, shape)
    plan = fs.compile(model, spec, solver=args.solver, nfe=args.nfe, spacing=spacing, shape=shape,
                      dtype=next(net.parameters()).dtype, guidance_scale=guidance, device=device, cond=cond,
                      **_plan_kw(args, quant))
    return plan, cond


def _verify(plan, cond, path) -> float:
    """Relative L2 difference of the file on onnxruntime and the plan on the same random noise and the
    example conditioning (a stochastic plan's recorded stage noise is fed to the file)."""
    import torch

    import fewstep as fs

    ort_plan = fs.load_onnx(path)
    noise = torch.randn(plan.shape, generator=torch.Generator().manual_seed(1)).to(plan.device)
    ref = plan(noise, seed=1, **cond)
    stage_noise = torch.stack(plan.recorded_noise()) if ort_plan.stochastic else None
    out = ort_plan(noise, stage_noise=stage_noise, **cond).to(ref.device)
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
