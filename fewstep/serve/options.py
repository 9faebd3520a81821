"""``ServeOptions``: everything a serving replica needs, one frozen object that travels as plain JSON data.

The command line builds it (``fewstep serve``), the deployment takes it as its only argument, and the Serve
config file written by ``fewstep serve --print-config`` carries it as the application's ``args``: one
source for the model, the default sampler and every limit.  No Ray here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ServeOptions", "MODELS", "DEVICES", "QUANT_MODES", "TUNED"]

MODELS = ("digits",)  # bundled models; any other model comes from a local diffusers directory (``diffusers``)
DEVICES = ("cpu", "cuda")
QUANT_MODES = ("fp8", "fp8-emulated", "int4", "int4-emulated", "w4a8", "w4a8-emulated")
TUNED = "tuned"  # the solver name of the --tuned program in requests


@dataclass(frozen=True)
class ServeOptions:
    """A replica's model, default sampler and limits.  Invalid values raise ValueError naming the field."""

    # "digits" (the bundled model), or the name shown for ``diffusers`` below.
    model: str = "digits"
    # A local diffusers pipeline / model directory (class-conditional DiT), loaded from disk on each replica;
    # None: the bundled model.  The path must exist on every machine that runs a replica.
    diffusers: str | None = None
    # The diffusers scheduler config JSON of a bare model directory (a pipeline directory brings its own).
    scheduler_config: str | None = None
    # Defaults of a request that does not name them.
    solver: str = "unipc"
    nfe: int = 8
    # Classifier-free guidance scale, >= 0; 0: off.
    guidance_scale: float = 1.5
    # The network's linear layers: None or a mode of fewstep.quant.QuantConfig ("fp8", "int4", "w4a8", and
    # their "-emulated" forms).
    quant: str | None = None
    # A tuned program's JSON file (``fs.tune`` / ``fewstep tune``), loaded on each replica (the path must
    # exist on every machine that runs one): requests name it as solver "tuned", at the nfe and guidance it
    # was tuned for.
    tuned: str | None = None
    # "cpu" or "cuda" (one GPU per replica).
    device: str = "cpu"
    # Serve replicas of the deployment.
    replicas: int = 1
    # Ray CPUs reserved per replica; a CPU replica also runs its network on that many threads.
    cpus_per_replica: float = 1.0
    # Most rows (labels) in one plan call, and so in one request: concurrent requests are merged up to this
    # many rows and padded to a bucket (powers of two up to it).
    max_batch: int = 8
    # Plan calls one run may make: a busy replica takes up to max_batch * batch_calls rows of waiting requests
    # into its next run and packs them into calls of max_batch rows (first-fit decreasing); every request of
    # a run is answered when its last call is done.  Digits model, 2-core CPU shared with other jobs, 16
    # clients, 96 requests each: 1-label requests 26.5 / 35.5 requests/s with 1 vs 22.8 / 26.7 with 2;
    # 1..8 labels 30-31 vs 31-33.5 rows/s (within the noise): 1 call, so no request waits for a second one.
    batch_calls: int = 1
    # How long a replica waits for more requests to merge after the first one of a batch arrives.
    batch_wait_ms: float = 5.0
    # Largest nfe a request may ask for.
    max_nfe: int = 50
    # Programs (solver, nfe, guidance) a replica keeps compiled, least recently used dropped first.
    max_engines: int = 4
    # Requests one replica holds at once (running or waiting for a batch); more wait in Serve's queue.
    max_ongoing: int = 32
    # Requests waiting for a replica, per proxy; beyond this Serve answers 503 with Retry-After.
    max_queued: int = 64
    # The Retry-After of an overload answer, seconds.
    retry_after_s: float = 1.0
    # A request not answered after this long gets 504 from the replica (the HTTP proxy gives up a little
    # later, with 408, if the replica cannot answer at all).
    timeout_s: float = 30.0

    def __post_init__(self):
        _str("model", self.model)
        for name in ("diffusers", "scheduler_config", "tuned"):
            v = getattr(self, name)
            if v is not None:
                _str(name, v)
        if self.diffusers is None and self.model not in MODELS:
            raise ValueError(f"ServeOptions.model: expected one of {MODELS} (or a diffusers directory), got "
                             f"{self.model!r}")
        if self.scheduler_config is not None and self.diffusers is None:
            raise ValueError("ServeOptions.scheduler_config applies only with a diffusers directory")
        _str("solver", self.solver)
        if self.solver == TUNED and self.tuned is None:
            raise ValueError(f"ServeOptions.solver: {TUNED!r} needs a tuned file (ServeOptions.tuned)")
        for name, lo in (("nfe", 1), ("replicas", 1), ("max_batch", 1), ("batch_calls", 1), ("max_nfe", 1),
                         ("max_engines", 1), ("max_ongoing", 1), ("max_queued", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"ServeOptions.{name}: expected an int >= {lo}, got {v!r}")
        if self.nfe > self.max_nfe:
            raise ValueError(f"ServeOptions.nfe: the default nfe {self.nfe} exceeds max_nfe {self.max_nfe}")
        for name, lo, open_ in (("guidance_scale", 0.0, False), ("cpus_per_replica", 0.0, True),
                                ("batch_wait_ms", 0.0, False), ("retry_after_s", 0.0, False),
                                ("timeout_s", 0.0, True)):
            v = getattr(self, name)
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            if bad or v < lo or (open_ and v == lo):
                rel = ">" if open_ else ">="
                raise ValueError(f"ServeOptions.{name}: expected a finite number {rel} {lo:g}, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.quant is not None and self.quant not in QUANT_MODES:
            raise ValueError(f"ServeOptions.quant: expected None or one of {QUANT_MODES}, got {self.quant!r}")
        if self.device not in DEVICES:
            raise ValueError(f"ServeOptions.device: expected one of {DEVICES}, got {self.device!r}")

    @property
    def guidance(self) -> float | None:
        """The default guidance as fs.Engine takes it (None: off)."""
        return None if self.guidance_scale == 0 else self.guidance_scale

    def to_args(self) -> dict[str, Any]:
        """JSON-able data (the Serve config's ``args``); :meth:`from_args` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> "ServeOptions":
        """Options from ``args`` (a Serve config's application ``args``); missing keys take their defaults,
        unknown keys are a ValueError naming them."""
        args = dict(args or {})
        unknown = sorted(set(args) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown fewstep serve option(s) {unknown}; known: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**args)


def _str(name: str, v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise ValueError(f"ServeOptions.{name}: expected a non-empty string, got {v!r}")
