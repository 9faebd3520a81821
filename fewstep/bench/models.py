"""The networks the benchmarks time: diffusers model classes from their published configs, random weights.

:func:`random_model` builds each (class, config, device, dtype) once per process, directly on the device (the
parameters are created there, under a ``torch.device`` context, instead of being initialized on the CPU in
fp32 and copied over), from a fixed seed, without touching the caller's random state.  Callers that change a
model (quantize it) work on a ``copy.deepcopy``: the cached one stays as built.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["random_model", "DIT_XL_2", "DIT_TINY", "SD15_UNET"]

# DiTTransformer2DModel: DiT-XL/2 at 256 px (facebook/DiT-XL-2-256's transformer config)
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
# the same architecture, small enough for the CPU dry run
DIT_TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10)
# UNet2DConditionModel: the SD1.5 UNet (runwayml/stable-diffusion-v1-5's unet config)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SEED = 0


def random_model(class_name: str, config: dict, device: torch.device | str, dtype: torch.dtype,
                 seed: int = SEED) -> torch.nn.Module:
    """``diffusers.<class_name>(**config)`` with random weights from ``seed``, on ``device`` in ``dtype``, in
    eval mode; the same object for the same arguments (built once per process).

    The weights depend on the seed and on the device's random generator (a CUDA build differs from a CPU
    build), never on what ran before.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    return _build(class_name, _frozen(config), device, dtype, seed)


def _frozen(config: dict) -> tuple:
    def freeze(v):
        return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v

    if not isinstance(config, dict):
        raise ValueError(f"config: expected a dict of constructor arguments, got {type(config).__name__}")
    return tuple(sorted((k, freeze(v)) for k, v in config.items()))


@functools.lru_cache(maxsize=4)  # DiT-XL/2 and the SD1.5 UNet, each in up to two dtypes / devices
def _build(class_name: str, config: tuple, device: torch.device, dtype: torch.dtype, seed: int):
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"diffusers has no model class {class_name!r}")
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        with torch.device(device):
            model = cls(**dict(config))
    return model.to(device=device, dtype=dtype).eval()
