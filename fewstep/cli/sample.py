"""``fewstep sample``: sample with the bundled digits model, or with a diffusers model from a local directory.

Bundled model: ``fewstep sample --solver unipc --nfe 8 --guidance 2 --labels 0,1,2 --out digits.png``.

Local diffusers directory (loaded with ``from_pretrained`` from disk, never the network):

* a pipeline directory (``model_index.json``) with a ``transformer`` or ``unet`` and a ``scheduler``; a
  ``vae`` next to them, if present, decodes the latents into the PNG;
* or a bare model directory (``config.json`` of DiTTransformer2DModel, UNet2DConditionModel,
  SD3Transformer2DModel or FluxTransformer2DModel) plus ``--scheduler-config`` (a diffusers scheduler JSON).

Class-conditional DiTs take ``--labels``; text-conditioned models take ``--cond FILE.pt``, a ``torch.save``d
dict of conditioning tensors for one image (e.g. ``encoder_hidden_states``,
``negative_encoder_hidden_states``,
``pooled_projections``...), repeated over the batch.  Latents are also written next to the PNG as ``.pt``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_MODEL_DIRS = ("transformer", "unet")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", default="unipc", help="solver name (see `fewstep solvers`; default: unipc)")
    p.add_argument("--nfe", type=int, default=8, help="network calls (default: 8)")
    p.add_argument(
        "--guidance", type=float, default=2.0, help="classifier-free guidance scale; 0 or less: off"
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--out", default="samples.png", help="output PNG (default: samples.png)")
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
    p.add_argument("--cond", metavar="FILE.pt", default=None, help="conditioning tensors for text models")
    p.add_argument("--batch", type=int, default=1, help="images for text-conditioned models (default: 1)")
    p.add_argument("--size", type=int, default=None, help="latent height/width (default: the model's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _labels(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return default
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"--labels: expected comma-separated integers, got {text!r}") from e


def run(args: argparse.Namespace) -> int:
    import torch

    if args.nfe < 1:
        raise ValueError(f"--nfe must be >= 1, got {args.nfe}")
    guidance = args.guidance if args.guidance > 0 else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.diffusers is None:
        return _sample_bundled(args, guidance, device)
    return _sample_diffusers(args, guidance, device)


def _sample_bundled(args, guidance, device) -> int:
    import torch

    import fewstep as fs
    from fewstep.cli.png import image_grid, write_png
    from fewstep.models import digits

    labels = digits.check_class_labels(_labels(args.labels, list(range(10))), allow_null=False)
    dit, _ = digits.load_digits_dit()
    model, spec = fs.models.from_diffusers(dit.to(device), digits.digits_scheduler_config())
    t0 = time.perf_counter()
    plan = fs.compile(
        model,
        spec,
        solver=args.solver,
        nfe=args.nfe,
        spacing=args.spacing,
        shape=(len(labels), *digits.SAMPLE_SHAPE),
        guidance_scale=guidance,
        device=device,
        cond={"class_labels": labels.to(device)},
    )
    noise = torch.randn(len(labels), *digits.SAMPLE_SHAPE, generator=torch.Generator().manual_seed(args.seed))
    x = plan(noise.to(device), class_labels=labels.to(device), seed=args.seed).clamp(-1, 1).cpu()
    write_png(args.out, image_grid(x[:, 0].numpy(), rows=1, scale=4))
    print(
        f"wrote {args.out}: digits {labels.tolist()} ({args.solver}, NFE {args.nfe}, guidance "
        f"{guidance or 0:g}, {time.perf_counter() - t0:.2f} s including the plan build)"
    )
    return 0


def _load_dir(path: Path, scheduler_config: str | None, device):
    """(network, scheduler config dict, vae or None) from a pipeline or bare model directory, disk only."""
    import diffusers

    from fewstep.models import SUPPORTED_MODELS

    if not path.is_dir():
        raise FileNotFoundError(f"--diffusers {path}: no such directory")
    vae = None
    if (path / "model_index.json").is_file():
        sub = next((path / d for d in _MODEL_DIRS if (path / d / "config.json").is_file()), None)
        if sub is None:
            raise ValueError(f"{path} has no {' or '.join(_MODEL_DIRS)}/config.json")
        sched_file = path / "scheduler" / "scheduler_config.json"
        if scheduler_config is None and not sched_file.is_file():
            raise FileNotFoundError(f"{sched_file} is missing (or pass --scheduler-config)")
        scheduler_config = scheduler_config or str(sched_file)
        if (path / "vae" / "config.json").is_file():
            vae = (
                diffusers.AutoencoderKL.from_pretrained(path / "vae", local_files_only=True).to(device).eval()
            )
        model_dir = sub
    else:
        model_dir = path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has neither model_index.json nor config.json")
        if scheduler_config is None:
            raise ValueError("a bare model directory needs --scheduler-config JSON")
    cls_name = json.loads((model_dir / "config.json").read_text()).get("_class_name", "")
    names = list(SUPPORTED_MODELS)
    if cls_name not in names:
        raise ValueError(
            f"unsupported model class {cls_name!r} in {model_dir}; supported: {', '.join(names)}"
        )
    net = getattr(diffusers, cls_name).from_pretrained(model_dir, local_files_only=True).to(device).eval()
    sched_path = Path(scheduler_config)
    if not sched_path.is_file():
        raise FileNotFoundError(f"scheduler config {sched_path} not found")
    return net, json.loads(sched_path.read_text()), vae


def _sample_diffusers(args, guidance, device) -> int:
    import numpy as np
    import torch

    import fewstep as fs
    from fewstep.cli.png import write_png

    net, sched_cfg, vae = _load_dir(Path(args.diffusers), args.scheduler_config, device)
    model, spec = fs.models.from_diffusers(net, sched_cfg)
    cfg = net.config
    cls = type(net).__name__
    cond: dict = {}
    if cls == "DiTTransformer2DModel":
        n_classes = int(cfg.num_embeds_ada_norm)
        labels = _labels(args.labels, [0])
        bad = [y for y in labels if not 0 <= y < n_classes]
        if bad:
            raise ValueError(f"unknown class label(s) {bad}; this model knows 0..{n_classes - 1}")
        batch = len(labels)
        cond["class_labels"] = torch.tensor(labels, device=device)
    else:
        if args.cond is None:
            raise ValueError(f"{cls} is text-conditioned: pass --cond FILE.pt with its conditioning tensors")
        loaded = torch.load(args.cond, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict):
            raise ValueError(f"--cond {args.cond}: expected a dict of tensors, got {type(loaded).__name__}")
        batch = args.batch
        cond = {
            k: v.expand(batch, *v.shape[1:]).contiguous().to(device) if v.dim() > 0 else v.to(device)
            for k, v in loaded.items()
        }
    size = args.size or int(getattr(cfg, "sample_size", 64))
    channels = int(getattr(cfg, "in_channels", 4))
    if cls == "FluxTransformer2DModel":
        channels //= 4  # Flux's in_channels counts packed 2x2 patches
    shape = (batch, channels, size, size)
    dtype = next(net.parameters()).dtype
    spacing = args.spacing
    if spacing is None and getattr(model, "pipeline_spacing", None) is not None:
        spacing = model.pipeline_spacing(args.nfe, shape)
    t0 = time.perf_counter()
    plan = fs.compile(
        model,
        spec,
        solver=args.solver,
        nfe=args.nfe,
        spacing=spacing,
        shape=shape,
        dtype=dtype,
        guidance_scale=guidance,
        device=device,
        cond=cond,
    )
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    latents = plan(noise, seed=args.seed, **cond)
    out = Path(args.out)
    torch.save(latents.cpu(), out.with_suffix(".pt"))
    if vae is not None:
        with torch.no_grad():
            sf = float(getattr(vae.config, "scaling_factor", 1.0))
            img = vae.decode(latents.to(vae.dtype) / sf).sample.clamp(-1, 1).float().cpu()
        tiles = ((img.permute(0, 2, 3, 1).numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)
        write_png(
            out,
            np.concatenate(list(tiles), axis=1)
            if tiles.shape[-1] == 3
            else np.concatenate(list(tiles[..., 0]), axis=1),
        )
        print(f"wrote {out} and {out.with_suffix('.pt')}", end="")
    else:
        print(f"wrote latents {out.with_suffix('.pt')} (no vae/ in {args.diffusers}: no PNG)", end="")
    print(
        f" ({cls}, {args.solver}, NFE {args.nfe}, {time.perf_counter() - t0:.2f} s including the plan build)",
        file=sys.stdout,
    )
    return 0
