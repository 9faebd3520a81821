"""What every kernel module shares: the optional Triton import, the interpreter check, the launch checks and
the launch heuristic of row kernels.

Triton is optional at import time: without it ``triton`` and ``tl`` are None, the kernel modules define no
kernels, their launchers raise a clear error and their ``<op>_ref`` references run as usual.  Whether kernels
run compiled or interpreted is fixed when they are decorated, by ``TRITON_INTERPRET=1`` in the environment at
that moment: set it before importing ``fewstep.kernels`` (``tests/conftest.py`` does, on machines without
CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["triton", "tl", "interpreting", "check_launch", "LaunchConfig", "row_config", "MAX_ROW"]

try:  # kernels are optional at import time: CPU-only installs run the references
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised in a subprocess by tests/kernels/test_triton_support.py
    triton = None
    tl = None

# A row kernel holds one row in registers, as one tile: 16384 fp32 per program (DiT-XL/2's widest row is 4608,
# Flux's feed-forward 12288).
MAX_ROW = 16384


if triton is not None:

    @triton.jit
    def _probe():
        pass


def interpreting() -> bool:
    """Whether this package's Triton kernels run under Triton's interpreter (on CPU tensors)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


def check_launch(device: torch.device, op: str) -> None:
    """Raise a RuntimeError naming the way out when ``op``'s Triton kernel cannot run on ``device``.

    Kernels run on CUDA tensors, or on CPU tensors under the interpreter; ``<op>_ref`` runs anywhere.
    """
    if triton is None:
        raise RuntimeError(f"{op} needs triton, which is not installed; use {op}_ref")
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return
    if device.type == "cpu":
        raise RuntimeError(f"{op} on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported; "
                           f"use {op}_ref on CPU")
    raise RuntimeError(f"{op} runs on CUDA tensors (or CPU tensors under the interpreter), got {device}; "
                       f"use {op}_ref")


@dataclass(frozen=True)
class LaunchConfig:
    """A 1-d launch: ``block`` elements per program (a power of two, for ``tl.arange``) and ``num_warps``."""

    block: int
    num_warps: int

    def __post_init__(self):
        if not isinstance(self.block, int) or self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"block: expected a power of two, got {self.block!r}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps: expected one of 1, 2, 4, 8, 16, 32, got {self.num_warps!r}")


def row_config(width: int, op: str) -> LaunchConfig:
    """The launch of a row kernel (one program per row, the whole row in one tile) for rows of ``width``.

    block: the next power of two of ``width``, at least 16; num_warps: 4 up to 2048 elements, 8 above.  Not
    yet measured on a GPU (Liger-Kernel's ``calculate_settings`` follows the same kind of rule, with 16 and 32
    warps for wider rows).  ``width`` over :data:`MAX_ROW` is a ValueError.
    """
    if width > MAX_ROW:
        raise ValueError(f"{op} holds a row in one tile: at most {MAX_ROW} elements, got {width}")
    block = max(16, 1 << (max(int(width), 1) - 1).bit_length())
    return LaunchConfig(block, 4 if block <= 2048 else 8)
