"""Argument checks shared by the commands, run before any expensive work.

The ``*_arg`` functions are argparse ``type=`` callables (a bad value is a one-line usage error); the others
are called at the start of a command's ``run`` and raise ValueError naming the option and what was expected.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

__all__ = ["positive_int_arg", "int_at_least", "guidance_arg", "device", "writable_file", "guidance_or_none"]


def int_at_least(lo: int):
    """argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"  # argparse names the type in its messages
    return parse


positive_int_arg = int_at_least(1)


def guidance_arg(text: str) -> float:
    """argparse type: a classifier-free guidance scale, a finite number >= 0 (0: no guidance)."""
    try:
        w = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: no guidance), got {text!r}") from None
    if not math.isfinite(w) or w < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0: no guidance), got {text!r}")
    return w


def guidance_or_none(w: float) -> float | None:
    """The command line's guidance scale as fs.compile takes it: 0 means off (None)."""
    return None if w == 0 else w


def device(text: str | None):
    """``--device``: cpu, cuda or cuda:N, checked against this machine; None picks cuda when available."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {text}: CUDA is not available ({why}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def writable_file(path: str | Path, what: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """Check that ``path`` can be written (its directory exists and takes a new file, it is not a directory,
    an existing file is writable) without creating or changing it; ``suffixes``: the allowed endings."""
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {p}: expected a file name ending in {' or '.join(suffixes)}")
    if p.is_dir():
        raise ValueError(f"{what} {p}: is a directory, expected a file name")
    parent = p.parent
    if not parent.exists():
        raise ValueError(f"{what} {p}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{what} {p}: {parent} is not a directory")
    try:
        if p.exists():
            with open(p, "ab"):  # opening for append changes nothing
                pass
        else:  # a scratch file beside it, removed at once: the output itself appears only when written
            fd, scratch = tempfile.mkstemp(dir=parent, prefix=".fewstep-write-check-")
            os.close(fd)
            os.unlink(scratch)
    except OSError as e:
        raise ValueError(f"{what} {p}: cannot write there ({e.strerror or e})") from None
    return p
