"""Image output of the commands: a grid of small samples, written as PNG by Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["image_grid", "save_png"]


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write ``image`` (H, W) or (H, W, 3) uint8 to ``path`` as an 8-bit grayscale or RGB PNG."""
    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"expected a (H, W) or (H, W, 3) uint8 array, got {a.shape} {a.dtype}")
    path = Path(path)
    Image.fromarray(np.ascontiguousarray(a)).save(path, format="PNG")  # uint8: mode L (H, W) or RGB
    return path


def image_grid(
    images: np.ndarray, rows: int, *, scale: int = 1, pad: int = 1, lo: float = -1.0, hi: float = 1.0
) -> np.ndarray:
    """Tile ``images`` (N, H, W) floats in [lo, hi] into a uint8 grid of ``rows`` rows, each pixel ``scale``
    times enlarged, with ``pad`` pixels of black between tiles."""
    imgs = np.asarray(images, dtype=np.float64)
    if imgs.ndim != 3:
        raise ValueError(f"expected (N, H, W) images, got shape {imgs.shape}")
    n, h, w = imgs.shape
    cols = -(-n // rows)
    u8 = np.clip((imgs - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    u8 = u8.repeat(scale, axis=1).repeat(scale, axis=2)
    th, tw = h * scale, w * scale
    out = np.zeros((rows * (th + pad) + pad, cols * (tw + pad) + pad), dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        out[y : y + th, x : x + tw] = u8[k]
    return out
