"""``fewstep sample``: sample with the bundled digits model, or with a diffusers model from a local directory.

Bundled model: ``fewstep sample --solver unipc --nfe 8 --guidance 2 --labels 0,1,2 --out digits.png``.

Local diffusers directory (loaded with ``from_pretrained`` from disk, never the network, safetensors weights
only: a pickled ``.bin`` is never loaded):

* a pipeline directory (``model_index.json``) with a ``transformer`` or ``unet`` and a ``scheduler``; a
  ``vae`` next to them, if present, decodes the latents into the PNG;
* or a bare model directory (``config.json`` of DiTTransformer2DModel, UNet2DConditionModel,
  SD3Transformer2DModel or FluxTransformer2DModel) plus ``--scheduler-config`` (a diffusers scheduler JSON).

Class-conditional DiTs take ``--labels``; text-conditioned models take ``--cond FILE``, the conditioning
tensors of one image by name (e.g. ``encoder_hidden_states``, ``negative_encoder_hidden_states``,
``pooled_projections``...) in a ``.safetensors`` file (``safetensors.torch.save_file``) or a ``.npz``
(``numpy.savez``), repeated over ``--batch``.  Both are read as plain data: nothing is unpickled.  The latents
are written next to the PNG, as ``latents`` in a ``.safetensors`` file.

An exported plan (``fewstep export``): ``fewstep sample --backend onnxruntime FILE [--labels ...]
[--cond FILE] --out OUT``: the file on onnxruntime, its solver, NFE, guidance and batch fixed inside it
(``--solver``, ``--nfe``, ``--guidance`` do not apply).  A file with ``class_labels`` of 8x8 one-channel
samples (the bundled digits model) writes a PNG; any other writes its samples as ``latents`` in a
``.safetensors`` file next to OUT.

Every argument is checked before the model is loaded: the output path is writable, the device exists, the
solver is known, the guidance scale is a finite number >= 0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import one_line
from .checks import device as check_device
from .checks import guidance_arg, guidance_or_none, positive_int_arg, writable_file
from .diffusers_dir import decoded_strip, latent_shape, pipeline_spacing
from .diffusers_dir import load_diffusers_dir as _load_dir

_COND_SUFFIXES = (".safetensors", ".npz")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", default="unipc", help="solver name (see `fewstep solvers`; default: unipc)")
    p.add_argument("--nfe", type=positive_int_arg, default=8, help="network calls (default: 8)")
    p.add_argument(
        "--guidance",
        type=guidance_arg,
        default=2.0,
        help="classifier-free guidance scale, >= 0; 0: off (default: 2)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument(
        "--out",
        default="samples.png",
        help="output PNG; --diffusers also writes the latents beside it, .safetensors (default: samples.png)",
    )
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated class labels, one image each (bundled model default: 0..9)",
    )
    p.add_argument("--spacing", default=None, help="timestep spacing (default: the solver's / config's)")
    p.add_argument(
        "--diffusers", metavar="PATH", default=None, help="a local diffusers pipeline or model dir"
    )
    p.add_argument(
        "--scheduler-config",
        metavar="JSON",
        default=None,
        help="diffusers scheduler config for a bare model directory",
    )
    p.add_argument(
        "--cond",
        metavar="FILE",
        default=None,
        help="conditioning tensors for text models: .safetensors or .npz (never a pickle)",
    )
    p.add_argument(
        "--batch", type=positive_int_arg, default=None, help="images for text-conditioned models (default: 1)"
    )
    p.add_argument(
        "--size", type=positive_int_arg, default=None, help="latent height/width (default: the model's)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--backend", nargs="+", metavar="NAME", default=["torch"],
                   help="torch (default: a plan built here), or `onnxruntime FILE`: a file from "
                        "`fewstep export`")
    p.add_argument("--tuned", metavar="FILE", default=None,
                   help="a tuned solver written by `fewstep tune` for the same model: its solver, NFE, grid "
                        "and guidance replace --solver / --nfe / --spacing / --guidance")


def _labels(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return default
    try:
        labels = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"--labels: expected comma-separated integers, got {text!r}") from e
    if not labels:
        raise ValueError(f"--labels: expected at least one label, got {text!r}")
    return labels


def run(args: argparse.Namespace) -> int:
    import fewstep as fs

    # every argument is checked here, before a model is loaded
    fs.solvers.get(args.solver)  # an unknown name names the valid ones
    device = check_device(args.device)
    out = writable_file(args.out, "--out", suffixes=(".png",))
    guidance = guidance_or_none(args.guidance)
    if args.backend != ["torch"]:
        return _sample_onnx(args, out)
    if args.diffusers is None:
        given = [f"--{k.replace('_', '-')}" for k in ("scheduler_config", "cond", "batch", "size")
                 if getattr(args, k) is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} only {verb} with --diffusers DIR (the bundled digits model "
                             "takes --labels)")
        return _sample_bundled(args, out, guidance, device)
    writable_file(out.with_suffix(".safetensors"), "--out (latents)")
    if args.cond is not None and Path(args.cond).suffix.lower() not in _COND_SUFFIXES:
        raise ValueError(_cond_suffix_message(args.cond))
    return _sample_diffusers(args, out, guidance, device)


def _sample_bundled(args, out: Path, guidance, device) -> int:
    import torch

    import fewstep as fs
    from fewstep.cli.images import image_grid, save_png
    from fewstep.models import digits

    labels = digits.check_class_labels(_labels(args.labels, list(range(10))), allow_null=False)
    solver, spacing = args.solver, args.spacing
    if args.tuned is not None:  # a file for another model or a malformed one fails here, before the weights
        solver = fs.load_tuned(args.tuned, spec=digits.digits_spec())
        args.nfe, spacing, guidance = solver.nfe, None, solver.program.guidance_scale
    else:
        # the program alone first (milliseconds): an NFE or spacing the solver cannot do fails before the
        # weights
        fs.solvers.build(args.solver, digits.digits_spec(), args.nfe, args.spacing, guidance_scale=guidance)
    dit, _ = digits.load_digits_dit()
    model, spec = fs.models.from_diffusers(dit.to(device), digits.digits_scheduler_config())
    t0 = time.perf_counter()
    plan = fs.compile(
        model,
        spec,
        solver=solver,
        nfe=args.nfe,
        spacing=spacing,
        shape=(len(labels), *digits.SAMPLE_SHAPE),
        guidance_scale=guidance,
        device=device,
        cond={"class_labels": labels.to(device)},
    )
    noise = torch.randn(len(labels), *digits.SAMPLE_SHAPE, generator=torch.Generator().manual_seed(args.seed))
    x = plan(noise.to(device), class_labels=labels.to(device), seed=args.seed).clamp(-1, 1).cpu()
    save_png(out, image_grid(x[:, 0].numpy(), rows=1, scale=4))
    print(
        f"wrote {out}: digits {labels.tolist()} ({args.solver if args.tuned is None else args.tuned}, "
        f"NFE {args.nfe}, guidance "
        f"{guidance or 0:g}, {time.perf_counter() - t0:.2f} s including the plan build)"
    )
    return 0


def _cond_suffix_message(path) -> str:
    return (f"--cond {path}: expected a .safetensors or .npz file of named tensors; other formats (a pickled "
            ".pt included) are not loaded: save them with safetensors.torch.save_file(tensors, path)")


def _load_cond(path: Path) -> dict:
    """The named tensors of a ``--cond`` file, read as data (safetensors, or npz without pickles)."""
    import numpy as np
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"--cond {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in _COND_SUFFIXES:
        raise ValueError(_cond_suffix_message(path))
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            with np.load(path, allow_pickle=False) as f:
                tensors = {k: torch.from_numpy(np.array(f[k])) for k in f.files}
    except Exception as e:  # truncated, not that format, an object array (a pickle)
        raise ValueError(f"--cond {path}: not a readable {suffix} file of tensors ({one_line(e)})") from e
    if not tensors:
        raise ValueError(f"--cond {path}: holds no tensors")
    bad = {k: str(v.dtype) for k, v in tensors.items() if v.dtype == torch.bool or v.dtype.is_complex}
    if bad:
        raise ValueError(f"--cond {path}: expected float or integer tensors, got {bad}")
    return tensors


def _repeat_cond(tensors: dict, batch: int, path, device) -> dict:
    """Each tensor of one image (leading dim 1) repeated to ``batch``; a full batch is taken as it is."""
    cond = {}
    for k, v in tensors.items():
        if v.dim() > 0 and v.shape[0] not in (1, batch):
            raise ValueError(f"--cond {path}: tensor {k!r} has shape {tuple(v.shape)}; expected a leading "
                             f"dimension of 1 (repeated over --batch) or {batch} (the --batch)")
        if v.dim() > 0:
            v = v.expand(batch, *v.shape[1:]).contiguous()
        cond[k] = v.to(device)
    return cond


def _sample_diffusers(args, out: Path, guidance, device) -> int:
    import torch
    from safetensors.torch import save_file

    import fewstep as fs
    from fewstep.cli.images import save_png

    cond_tensors = _load_cond(Path(args.cond)) if args.cond is not None else None
    net, sched_cfg, vae = _load_dir(Path(args.diffusers), args.scheduler_config, device)
    model, spec = fs.models.from_diffusers(net, sched_cfg)
    solver, nfe = args.solver, args.nfe
    if args.tuned is not None:  # `fewstep tune --diffusers` wrote it; a file for another schedule fails here
        solver = fs.load_tuned(args.tuned, spec=spec)
        nfe, guidance = solver.nfe, solver.program.guidance_scale
    cfg = net.config
    cls = type(net).__name__
    cond: dict = {}
    if cls == "DiTTransformer2DModel":
        if args.cond is not None or args.batch is not None:
            raise ValueError(f"{cls} is class-conditional: it takes --labels, not --cond / --batch")
        n_classes = int(cfg.num_embeds_ada_norm)
        labels = _labels(args.labels, [0])
        bad = [y for y in labels if not 0 <= y < n_classes]
        if bad:
            raise ValueError(f"unknown class label(s) {bad}; this model knows 0..{n_classes - 1}")
        batch = len(labels)
        cond["class_labels"] = torch.tensor(labels, device=device)
    else:
        if args.labels is not None:
            raise ValueError(f"{cls} is text-conditioned: it takes --cond FILE, not --labels")
        if cond_tensors is None:
            raise ValueError(f"{cls} is text-conditioned: pass --cond FILE (.safetensors or .npz) with its "
                             "conditioning tensors")
        batch = args.batch or 1
        cond = _repeat_cond(cond_tensors, batch, args.cond, device)
    shape = latent_shape(net, batch, args.size)
    dtype = next(net.parameters()).dtype
    spacing = None if args.tuned is not None else pipeline_spacing(model, args.spacing, nfe, shape)
    t0 = time.perf_counter()
    plan = fs.compile(
        model,
        spec,
        solver=solver,
        nfe=nfe,
        spacing=spacing,
        shape=shape,
        dtype=dtype,
        guidance_scale=guidance,
        device=device,
        cond=cond,
    )
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    latents = plan(noise, seed=args.seed, **cond)
    lat_path = out.with_suffix(".safetensors")
    save_file({"latents": latents.detach().cpu().contiguous()}, str(lat_path))
    if vae is not None:
        save_png(out, decoded_strip(vae, latents))
        print(f"wrote {out} and {lat_path}", end="")
    else:
        print(f"wrote latents {lat_path} (no vae/ in {args.diffusers}: no PNG)", end="")
    seconds = time.perf_counter() - t0
    name = args.solver if args.tuned is None else f"tuned {solver.solver} ({args.tuned})"
    print(f" ({cls}, {name}, NFE {nfe}, {seconds:.2f} s including the plan build)")
    return 0


def _sample_onnx(args, out: Path) -> int:
    """``--backend onnxruntime FILE``: sample with an exported plan (its inputs checked by fs.load_onnx)."""
    import torch

    import fewstep as fs
    from fewstep.cli.images import image_grid, save_png

    if len(args.backend) != 2 or args.backend[0] != "onnxruntime":
        raise ValueError(f"--backend: expected `torch` or `onnxruntime FILE`, got {' '.join(args.backend)!r}")
    given = [f"--{k.replace('_', '-')}" for k in ("diffusers", "scheduler_config", "batch", "size", "spacing",
                                                   "tuned") if getattr(args, k, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} do not apply to --backend onnxruntime: the exported file fixes "
                         f"the model, shapes and solver")
    path = Path(args.backend[1])
    t0 = time.perf_counter()
    ort_plan = fs.load_onnx(path)
    batch = ort_plan.shape[0]
    cond = {}
    if "class_labels" in ort_plan.cond:
        labels = _labels(args.labels, [i % 10 for i in range(batch)])
        if len(labels) != batch:
            raise ValueError(f"--labels: {path} was exported for batch {batch}, got {len(labels)} labels")
        cond["class_labels"] = torch.tensor(labels, dtype=ort_plan.cond["class_labels"][1])
    elif args.labels is not None:
        raise ValueError(f"--labels: {path} has no class_labels input (its inputs: {sorted(ort_plan.cond)})")
    if args.cond is not None:
        if Path(args.cond).suffix.lower() not in _COND_SUFFIXES:
            raise ValueError(_cond_suffix_message(args.cond))
        cond.update(_repeat_cond(_load_cond(Path(args.cond)), batch, args.cond, torch.device("cpu")))
    digits = "class_labels" in ort_plan.cond and tuple(ort_plan.shape[1:]) == (1, 8, 8)
    lat_path = out.with_suffix(".safetensors")
    if not digits:
        writable_file(lat_path, "--out (latents)")
    noise = torch.randn(ort_plan.shape, generator=torch.Generator().manual_seed(args.seed))
    x = ort_plan(noise, seed=args.seed, **cond) if ort_plan.stochastic else ort_plan(noise, **cond)
    info = ort_plan.info
    what = f"{info.get('solver')}, NFE {info.get('nfe')}, guidance {info.get('guidance_scale') or 0:g}"
    seconds = time.perf_counter() - t0
    if digits:
        save_png(out, image_grid(x.clamp(-1, 1)[:, 0].numpy(), rows=1, scale=4))
        print(f"wrote {out}: labels {cond['class_labels'].tolist()} from {path} on onnxruntime ({what}, "
              f"{seconds:.2f} s including the session)")
        return 0
    from safetensors.torch import save_file

    save_file({"latents": x.contiguous()}, str(lat_path))
    print(f"wrote latents {lat_path} from {path} on onnxruntime ({what}, {seconds:.2f} s including the "
          f"session)")
    return 0
