"""Argument checks shared by the engine's modules: a plan's shape, device and dtype."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

__all__ = ["as_shape", "as_device", "as_dtype", "check_float_dtype"]


def as_shape(shape, what: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints: a sequence (not a string) of Python / NumPy ints or a
    ``torch.Size``.  Floats are refused even when integral (``2.0``), and so are bools."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"{what} must be a sequence of ints like (batch, C, H, W), got "
                        f"{type(shape).__name__} {shape!r}")
    dims = []
    for i, d in enumerate(shape):
        try:
            if type(d).__name__ in ("bool", "bool_"):  # True is an int to Python and to index()
                raise TypeError
            dims.append(operator.index(d))
        except TypeError:
            raise TypeError(f"{what}[{i}] must be an int, got {type(d).__name__} {d!r} (in {what}="
                            f"{tuple(shape)!r})") from None
    if not dims:
        raise ValueError(f"{what} must have at least one dimension (batch, ...), got ()")
    bad = [(i, d) for i, d in enumerate(dims) if d < 1]
    if bad:
        raise ValueError(f"{what}[{bad[0][0]}] must be a positive size, got {bad[0][1]} (in {what}="
                         f"{tuple(dims)})")
    return tuple(dims)


def _model_param(model) -> torch.Tensor | None:
    if isinstance(model, torch.nn.Module):
        return next(iter(model.parameters()), None)
    return None


def as_device(device, model) -> torch.device:
    """``device`` as a ``torch.device`` with an index (default: the model's, else CUDA if there is one)."""
    if device is None:
        p = _model_param(model)
        device = p.device if p is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    return device


def as_dtype(dtype, model) -> torch.dtype:
    """The network's input dtype (default: the model's parameter dtype if floating point, else float32)."""
    if dtype is None:
        p = _model_param(model)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    check_float_dtype(dtype)
    return dtype


def check_float_dtype(dtype, what: str = "dtype") -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating-point torch.dtype, got {dtype!r}")
