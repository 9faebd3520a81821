"""A local diffusers model directory, loaded from disk only (``fewstep sample --diffusers``, ``fewstep serve
--diffusers``): a pipeline directory (``model_index.json`` with a ``transformer`` or ``unet``, a
``scheduler`` and optionally a ``vae``) or a bare model directory plus a scheduler config JSON.  Weights are
read with ``from_pretrained(local_files_only=True, use_safetensors=True)``: never the network, never a
pickled ``.bin``.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import one_line

__all__ = ["load_diffusers_dir", "read_json", "decoded_strip"]

_MODEL_DIRS = ("transformer", "unet")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; errors name the file and what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path}: not readable JSON ({one_line(e)})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _from_pretrained(cls, model_dir: Path, device):
    """``cls.from_pretrained(model_dir)`` from disk and safetensors only; errors name the directory."""
    try:
        model = cls.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)
    except Exception as e:  # a missing, truncated or mismatched weights file: diffusers raises OSError etc.
        raise ValueError(f"--diffusers: cannot load {cls.__name__} from {model_dir} ({one_line(e)})") from e
    return model.to(device).eval()


def load_diffusers_dir(path: Path, scheduler_config: str | None, device):
    """(network, scheduler config dict, vae or None) from a pipeline or bare model directory, disk only."""
    import diffusers

    from fewstep.models import SUPPORTED_MODELS

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--diffusers {path}: no such directory")
    vae_dir = None
    if (path / "model_index.json").is_file():
        sub = next((path / d for d in _MODEL_DIRS if (path / d / "config.json").is_file()), None)
        if sub is None:
            raise ValueError(f"--diffusers {path}: no {' or '.join(_MODEL_DIRS)}/config.json")
        sched_file = path / "scheduler" / "scheduler_config.json"
        if scheduler_config is None and not sched_file.is_file():
            raise FileNotFoundError(f"{sched_file} is missing (or pass --scheduler-config)")
        scheduler_config = scheduler_config or str(sched_file)
        if (path / "vae" / "config.json").is_file():
            vae_dir = path / "vae"
        model_dir = sub
    else:
        model_dir = path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--diffusers {path}: has neither model_index.json nor config.json")
        if scheduler_config is None:
            raise ValueError("a bare model directory needs --scheduler-config JSON")
    sched = read_json(Path(scheduler_config), "scheduler config")
    cls_name = read_json(model_dir / "config.json", "model config").get("_class_name", "")
    names = list(SUPPORTED_MODELS)
    if cls_name not in names:
        raise ValueError(
            f"unsupported model class {cls_name!r} in {model_dir}; supported: {', '.join(names)}"
        )
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # no multi-line loading advice on stderr
    try:
        net = _from_pretrained(getattr(diffusers, cls_name), model_dir, device)
        vae = _from_pretrained(diffusers.AutoencoderKL, vae_dir, device) if vae_dir is not None else None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    return net, sched, vae


def latent_shape(net, batch: int, size: int | None) -> tuple[int, int, int, int]:
    """(batch, channels, size, size) of a diffusers network's latents: ``size``, else its config's
    ``sample_size`` (64 where it has none)."""
    cfg = net.config
    channels = int(getattr(cfg, "in_channels", 4))
    if type(net).__name__ == "FluxTransformer2DModel":
        channels //= 4  # Flux's in_channels counts packed 2x2 patches
    size = size or int(getattr(cfg, "sample_size", 64))
    return (batch, channels, size, size)


def pipeline_spacing(model, spacing, nfe: int, shape):
    """``spacing`` when given, else the spacing diffusers' pipeline uses for this model at ``shape`` (an
    adapter's ``pipeline_spacing``), else None (the solver's own)."""
    if spacing is None and getattr(model, "pipeline_spacing", None) is not None:
        return model.pipeline_spacing(nfe, shape)
    return spacing


def decoded_strip(vae, latents):
    """Decode ``latents`` (N, C, h, w) with ``vae`` into one uint8 image, the N images side by side:
    (H, N * W, 3) for RGB, (H, N * W) for one channel."""
    import numpy as np
    import torch

    with torch.no_grad():
        sf = float(getattr(vae.config, "scaling_factor", 1.0))
        img = vae.decode(latents.to(vae.dtype) / sf).sample.clamp(-1, 1).float().cpu()
    tiles = ((img.permute(0, 2, 3, 1).numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)
    return np.concatenate(list(tiles if tiles.shape[-1] == 3 else tiles[..., 0]), axis=1)
