"""The HTTP API's data: parsing and checking a ``POST /v1/sample`` body, each request's noise, the response
encodings.  No Ray here (clients and tests use it without a server).

Request: a JSON object ``{"labels": [int, ...], "seed": int, "solver": str, "nfe": int,
"guidance_scale": float, "format": "npy" | "png"}``; all but ``labels`` are optional and default to the
server's command line (a missing seed is drawn by the server and returned in the ``X-Fewstep-Seed`` header).
Unknown keys are an error, so a misspelt option is never silently ignored.

The noise of a request is :func:`request_noise`:
``torch.randn((len(labels), *sample_shape), generator=torch.Generator().manual_seed(seed))``, so a client
reproduces a response with ``fs.compile(model, spec, solver=..., nfe=..., guidance_scale=...,
shape=noise.shape, cond={"class_labels": labels})(noise, seed=seed, class_labels=labels)``.
"""

from __future__ import annotations

import io
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["RequestError", "SampleRequest", "parse_sample_request", "request_noise", "encode_npy",
           "decode_npy", "FORMATS", "SEED_LIMIT", "MAX_BODY_BYTES"]

FORMATS = {"npy": "application/x-npy", "png": "image/png"}
SEED_LIMIT = 2**63  # seeds are ints in [0, 2**63): what torch.Generator and fs.Plan's seed both take
MAX_BODY_BYTES = 1 << 16  # a request is a few numbers; a body larger than this is refused unread
_KEYS = ("labels", "seed", "solver", "nfe", "guidance_scale", "format")


class RequestError(ValueError):
    """A request the server refuses: ``status`` (a 4xx) and a one-line ``message``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SampleRequest:
    """A checked ``/v1/sample`` request (guidance_scale 0 is stored as None: off)."""

    labels: tuple[int, ...]
    seed: int
    solver: str
    nfe: int
    guidance_scale: float | None
    format: str

    @property
    def plan_key(self) -> tuple:
        """What selects the program: requests with equal keys can share one plan call."""
        return (self.solver, self.nfe, self.guidance_scale)


def request_noise(n: int, sample_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The starting noise of a request for ``n`` samples: float32 on the CPU, the same on every machine."""
    return torch.randn((n, *sample_shape), generator=torch.Generator().manual_seed(seed))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_sample_request(body: bytes, *, num_classes: int, max_batch: int, max_nfe: int, solvers,
                         default_solver: str, default_nfe: int, default_guidance: float | None,
                         formats: tuple[str, ...] = tuple(FORMATS)) -> SampleRequest:
    """Check a ``/v1/sample`` body; raises :class:`RequestError` (400, or 413 for an oversized body) naming
    the field, what was expected and what came.  ``solvers``: the known solver names."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"request body of {len(body)} bytes exceeds {MAX_BODY_BYTES}", status=413)
    try:
        data = json.loads(body)  # NaN / Infinity parse as floats; the field checks below refuse them
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an int of over 4300 digits
        raise RequestError(f"malformed JSON body ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                           ) from None
    if not isinstance(data, dict):
        raise RequestError(f"expected a JSON object like {{\"labels\": [1, 2]}}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; known: {list(_KEYS)}")
    if "labels" not in data:
        raise RequestError("missing field 'labels' (a list of class labels, one sample each)")
    labels = data["labels"]
    if not isinstance(labels, list) or not labels or not all(_is_int(y) for y in labels):
        raise RequestError(f"labels: expected a non-empty list of integers, got {_short(labels)}")
    if len(labels) > max_batch:
        raise RequestError(f"labels: at most {max_batch} per request (the server's --max-batch), got "
                           f"{len(labels)}")
    bad = sorted({y for y in labels if not 0 <= y < num_classes})
    if bad:
        raise RequestError(f"labels: unknown class label(s) {_short(bad)}; this model knows "
                           f"0..{num_classes - 1}")
    seed = data.get("seed")
    if seed is None:
        seed = secrets.randbelow(SEED_LIMIT)
    elif not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise RequestError(f"seed: expected an integer in [0, 2**63), got {_short(seed)}")
    solver = data.get("solver", default_solver)
    if not isinstance(solver, str) or solver not in solvers:
        raise RequestError(f"solver: unknown solver {_short(solver)}; known: {', '.join(sorted(solvers))}")
    nfe = data.get("nfe", default_nfe)
    if not _is_int(nfe) or not 1 <= nfe <= max_nfe:
        raise RequestError(f"nfe: expected an integer in 1..{max_nfe} (the server's --max-nfe), got "
                           f"{_short(nfe)}")
    if "guidance_scale" in data:
        w = data["guidance_scale"]
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise RequestError(f"guidance_scale: expected a finite number >= 0 (0: off), got {_short(w)}")
        guidance = None if w == 0 else float(w)
    else:
        guidance = default_guidance
    fmt = data.get("format", "npy")
    if fmt not in formats:
        raise RequestError(f"format: expected one of {list(formats)}, got {_short(fmt)}")
    return SampleRequest(tuple(labels), seed, solver, nfe, guidance, fmt)


def _short(v: Any, limit: int = 80) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict, str, int, float, bool, type(None))) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_npy(x: torch.Tensor) -> bytes:
    """A float32 tensor as ``.npy`` bytes (``numpy.save``)."""
    buf = io.BytesIO()
    np.save(buf, x.detach().to("cpu", torch.float32).contiguous().numpy(), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` response (read as data: object arrays, that is pickles, are refused)."""
    return np.load(io.BytesIO(data), allow_pickle=False)
