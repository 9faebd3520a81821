"""What a replica serves: the model (bundled digits, or a class-conditional DiT from a local diffusers
directory), its spec and sample shape, and an Engine per program.  No Ray here.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import bucket_sizes
from .options import TUNED, ServeOptions

__all__ = ["ServedModel", "load_served_model", "EngineCache"]

# a local diffusers model is served when it takes class labels (the API's "labels")
SERVABLE_CLASSES = ("DiTTransformer2DModel",)


@dataclass
class ServedModel:
    """The model a replica serves: ``model(x, t, class_labels=...)`` (an ``fs.models`` adapter), its spec,
    the shape of one sample, the labels it knows (0..num_classes-1), the network dtype and device, and the
    VAE that decodes its samples into images (None: samples are images themselves, or no PNG)."""

    name: str
    model: Any
    spec: Any
    sample_shape: tuple[int, ...]
    num_classes: int
    dtype: torch.dtype
    device: torch.device
    vae: Any = None

    @property
    def can_png(self) -> bool:
        """Whether ``format: "png"`` is offered: a VAE decodes the samples, or they are 1-channel images."""
        return self.vae is not None or self.sample_shape[0] == 1

    def png(self, samples: torch.Tensor) -> bytes:
        """The samples ``(n, *sample_shape)`` as one PNG, side by side (decoded by the VAE if there is one;
        1-channel samples in [-1, 1] drawn 4x enlarged)."""
        from PIL import Image

        if self.vae is not None:
            from ..cli.diffusers_dir import decoded_strip

            image = decoded_strip(self.vae, samples.to(self.device))
        elif self.sample_shape[0] == 1:
            from ..cli.images import image_grid

            image = image_grid(samples[:, 0].clamp(-1, 1).numpy(), rows=1, scale=4)
        else:
            raise ValueError(f"samples of shape {self.sample_shape} without a VAE cannot be drawn as a PNG")
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
        return buf.getvalue()

    def describe(self) -> dict:
        """The model part of ``GET /v1/models``."""
        return {"id": self.name, "sample_shape": list(self.sample_shape),
                "labels": {"min": 0, "max": self.num_classes - 1}, "spec": self.spec.describe(),
                "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "formats": ["npy", "png"] if self.can_png else ["npy"]}


def load_served_model(options: ServeOptions) -> ServedModel:
    """Load the model ``options`` name on ``options.device`` (weights from disk only)."""
    import fewstep as fs

    device = torch.device(options.device)
    if options.diffusers is None:
        from ..models import digits

        dit, _ = digits.load_digits_dit()
        model, spec = fs.models.from_diffusers(dit.to(device), digits.digits_scheduler_config())
        return ServedModel(options.model, model, spec, tuple(digits.SAMPLE_SHAPE), digits.NUM_CLASSES,
                           torch.float32, device)
    from ..cli.diffusers_dir import load_diffusers_dir

    net, sched_cfg, vae = load_diffusers_dir(Path(options.diffusers), options.scheduler_config, device)
    cls = type(net).__name__
    if cls not in SERVABLE_CLASSES:
        raise ValueError(f"--diffusers {options.diffusers}: {cls} is not served (requests carry class "
                         f"labels; served classes: {', '.join(SERVABLE_CLASSES)})")
    model, spec = fs.models.from_diffusers(net, sched_cfg)
    cfg = net.config
    size = int(cfg.sample_size)
    return ServedModel(options.model, model, spec, (int(cfg.in_channels), size, size),
                       int(cfg.num_embeds_ada_norm), next(net.parameters()).dtype, device, vae)


class EngineCache:
    """One ``fs.Engine`` per (solver, nfe, guidance), least recently used dropped beyond ``max_engines``.

    Used from the replica's event loop only (no lock); a dropped Engine lives on in the batches that hold
    it.  Each Engine keeps up to ``max_batch`` plans: the buckets, and for stochastic solvers every request
    size.  With ``options.tuned``, solver "tuned" is that file's program (read once, here; a file tuned for
    another model spec is a :class:`fewstep.solvers.TunedFileError`)."""

    def __init__(self, served: ServedModel, options: ServeOptions):
        self.served, self.options = served, options
        self._engines: OrderedDict[tuple, Any] = OrderedDict()
        self.tuned = None
        if options.tuned is not None:
            import fewstep as fs

            self.tuned = fs.load_tuned(options.tuned, spec=served.spec)

    @property
    def solvers(self) -> tuple[str, ...]:
        """The solver names requests may use: every registered solver, and "tuned" with a tuned file."""
        from ..solvers import available

        return (*available(), *((TUNED,) if self.tuned is not None else ()))

    def get(self, solver: str, nfe: int, guidance: float | None):
        """The Engine of this program, built on first use; a program the solver cannot build (an nfe beyond
        its grid, say) raises ValueError."""
        import fewstep as fs

        key = (solver, nfe, guidance)
        engine = self._engines.get(key)
        if engine is not None:
            self._engines.move_to_end(key)
            return engine
        spacing = None
        if solver == TUNED:
            if self.tuned is None:
                raise ValueError("this server has no tuned program (start it with --tuned FILE)")
            g = self.tuned.program.guidance_scale
            if (nfe, guidance) != (self.tuned.nfe, g):
                raise ValueError(f"the tuned program runs nfe={self.tuned.nfe}, guidance_scale={g or 0:g} "
                                 f"(tuned {self.tuned.solver}); this request asks nfe={nfe}, "
                                 f"guidance_scale={guidance or 0:g}")
            solver = self.tuned
        else:
            pipeline_spacing = getattr(self.served.model, "pipeline_spacing", None)
            if pipeline_spacing is not None:  # the spacing diffusers' pipeline uses for this model (`sample`)
                spacing = pipeline_spacing(nfe, (1, *self.served.sample_shape))
        engine = fs.Engine(self.served.model, self.served.spec, solver=solver, nfe=nfe, spacing=spacing,
                           guidance_scale=guidance, max_plans=self.options.max_batch,
                           quant=self.options.quant, dtype=self.served.dtype)
        self._engines[key] = engine
        while len(self._engines) > self.options.max_engines:
            self._engines.popitem(last=False)
        return engine

    def warm(self, solver: str, nfe: int, guidance: float | None) -> None:
        """Build the plans of every bucket of this program (a replica does it for its default program before
        it takes requests, so the first requests do not pay for plan builds)."""
        engine = self.get(solver, nfe, guidance)
        if engine.program.stochastic:
            return
        for b in bucket_sizes(self.options.max_batch):
            engine.plan_for(torch.zeros((b, *self.served.sample_shape), device=self.served.device),
                            class_labels=torch.zeros(b, dtype=torch.long, device=self.served.device))
