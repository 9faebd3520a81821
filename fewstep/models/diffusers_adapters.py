"""diffusers denoisers -> ``(callable, ModelSpec)``: the contract every fewstep sampler and plan uses.

``fn, spec = from_diffusers(model, scheduler_config=None)`` gives ``fn(x, t, **cond) -> raw output``:

* ``x``: the sample in the schedule's native space, already scaled for the network (fewstep folds the
  scheduler's ``scale_model_input`` into the program), shape ``(batch, C, H, W)``.  Flux takes its latents
  unpacked too (``(batch, in_channels // 4, H, W)``, H and W even); the adapter packs them, builds ``img_ids``
  and unpacks the output, so every adapter samples the same 4-d noise the pipelines draw.
* ``t``: the network time input of the program (``StepProgram.timesteps``), a Python float or a tensor of
  shape ``(batch,)``; it is handed to the network in float32, as the pipelines do (Flux: ``t / 1000``).
* ``cond``: the conditioning for the user's batch ``B``.

**Classifier-free guidance.**  A program with guidance calls ``fn`` on ``2B`` samples ``[uncond; cond]``
(first half unconditional) with the user's conditioning for ``B``; the adapter builds both halves.
It tells the two cases apart by batch: the main conditioning tensor (``class_labels`` for DiT,
``encoder_hidden_states`` otherwise) with ``B == x.shape[0] / 2`` means guidance; with ``B == x.shape[0]`` the
conditioning is used as given (no guidance, or the caller already stacked ``[uncond; cond]``).  The
unconditional half:

* DiT: the null class, ``num_embeds_ada_norm`` of the model config (1000 for ImageNet DiTs).
* UNet / SD3 / Flux: the caller passes the negative (empty-prompt) embeddings under the same name with a
  ``negative_`` prefix: ``negative_encoder_hidden_states``, and ``negative_text_embeds`` (SDXL) /
  ``negative_pooled_projections`` (SD3, Flux).  They are required with guidance; SDXL's
  ``force_zeros_for_empty_prompt`` is ``torch.zeros_like`` of the positive ones.  ``time_ids`` (SDXL),
  ``guidance`` and ``txt_ids`` (Flux) are shared by both halves, as in the pipelines (``negative_time_ids``
  overrides SDXL's).  Negatives are ignored without guidance.

How each pipeline's guidance maps onto the program's ``O_u + w (O_c - O_u)``:

* DiTPipeline guides the first ``in_channels`` output channels (eps) and drops the learned-variance channels
  (``out_channels == 2 * in_channels``); the adapter drops them before returning, so the program's combine is
  exactly the pipeline's.  DiTPipeline guides only when ``w > 1`` (build with ``guidance_scale=None``
  otherwise) and puts ``[cond; uncond]`` in its batch (the order does not change the result).  DiTPipeline
  never multiplies its starting noise by ``init_noise_sigma`` and steps from the *scaled* model input
  (``scale_model_input``'s output), so it is only right for schedulers where both are identities (DDIM,
  DPM-Solver, UniPC, DEIS: DiT's own); fewstep matches it there and is correct for Euler-type ones too.
* StableDiffusion(XL) / SD3: ``uncond + w (cond - uncond)`` on one batched call, as here.
  ``guidance_rescale > 0`` is not a linear combination and is not supported.
* Flux: distilled guidance is the ``guidance`` conditioning value (e.g. 3.5 for FLUX.1-dev; required when the
  model has ``guidance_embeds``); the program's guidance scale is FluxPipeline's ``true_cfg_scale`` (the
  pipeline's two calls become one call on ``2B`` here).

**ModelSpec.**  From ``scheduler_config`` when given (a scheduler, its ``.config``, a dict, or a ModelSpec);
otherwise the published default of the model family (:data:`DEFAULT_SCHEDULER_CONFIGS`): DiT -- DDPM linear
betas 1e-4..0.02, epsilon; UNet2DCondition -- SD1.5 / SDXL scaled-linear betas 0.00085..0.012, epsilon (pass
the scheduler config for v-prediction models such as SD2-768); SD3 -- rectified flow with shift 3; Flux --
rectified flow with resolution-dependent shift (FLUX.1-dev) if the model has ``guidance_embeds``, else shift 1
(FLUX.1-schnell).

**Timestep grids.**  DiT / UNet pipelines use the scheduler's own grid, which ``fs.solvers.build`` reproduces
from the spec (``fn.pipeline_spacing`` is None).  Flow pipelines depend on more than the spec: Flux samples
``linspace(1, 1/n, n)`` shifted by a ``mu`` that depends on the image size, dynamically shifted SD3 a ``mu``
too.  (A static shift needs nothing: the "flow" spacing is FlowMatchEulerDiscreteScheduler's grid for the
Euler family; the multistep family follows its schedulers' use_flow_sigmas grids, which differ.)
``fn.pipeline_spacing(nfe, shape)`` returns the pipeline's grid for latents of
``shape`` as an explicit ``Spacing("sigmas", ...)`` to pass to ``build``: any solver then visits the
pipeline's sigmas.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..solvers.spacing import Spacing
from ..solvers.spec import ModelSpec

__all__ = [
    "from_diffusers",
    "SUPPORTED_MODELS",
    "DEFAULT_SCHEDULER_CONFIGS",
    "DiTAdapter",
    "UNetAdapter",
    "SD3Adapter",
    "FluxAdapter",
]

_SD_BETAS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)
DEFAULT_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "DiTTransformer2DModel": dict(
        _class_name="DDIMScheduler",
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
    ),
    "UNet2DConditionModel": dict(_class_name="EulerDiscreteScheduler", **_SD_BETAS),
    "SD3Transformer2DModel": dict(
        _class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0
    ),
    "FluxTransformer2DModel": dict(
        _class_name="FlowMatchEulerDiscreteScheduler",
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "FluxTransformer2DModel/schnell": dict(
        _class_name="FlowMatchEulerDiscreteScheduler",
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=False,
    ),
}


# -- shared pieces -------------------------------------------------------------------------------------------
def _param(model: torch.nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _time(t: Any, n: int, device: torch.device) -> torch.Tensor:
    """The time input as float32 ``(n,)`` (the pipelines hand the network float32 scheduler timesteps)."""
    if isinstance(t, torch.Tensor):
        t = t.to(device=device, dtype=torch.float32)
        if t.ndim == 0 or t.numel() == 1:
            return t.reshape(1).expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must be a number or a tensor of shape ({n},), got shape {tuple(t.shape)}")
        return t
    return torch.full((n,), float(t), dtype=torch.float32, device=device)


def _as_tensor(v: Any, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        try:
            v = torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a tensor, got {type(v).__name__}") from e
    return v.to(device=device, dtype=dtype) if dtype is not None else v.to(device=device)


def _guided(x: torch.Tensor, cond_batch: int, name: str) -> tuple[bool, int]:
    """``(guided, B)`` from the batch of ``x`` and of the main conditioning tensor ``name``."""
    n = x.shape[0]
    if cond_batch == n:
        return False, n
    if 2 * cond_batch == n:
        return True, cond_batch
    raise ValueError(
        f"{name} has batch {cond_batch} but x has batch {n}: expected {n} (no guidance, or [uncond; cond] "
        f"already stacked) or {n // 2} (guidance: the adapter builds the unconditional half)"
    )


def _batched(v: torch.Tensor, b: int, name: str, trailing: int | None = None) -> torch.Tensor:
    """``v`` with a leading batch ``b`` (batch 1 expands; so does a missing batch dim if ndim == trailing)."""
    if trailing is not None and v.ndim == trailing:
        v = v.unsqueeze(0)
    if v.shape[0] == b:
        return v
    if v.shape[0] == 1:
        return v.expand(b, *v.shape[1:])
    raise ValueError(f"{name} has batch {v.shape[0]}, expected {b} (or 1)")


def _pair(
    cond: Mapping[str, Any],
    name: str,
    b: int,
    guided: bool,
    device,
    dtype,
    *,
    negative_default: str | None = None,
    trailing: int | None = None,
) -> torch.Tensor:
    """The network batch of conditioning ``name``: ``cond[name]``, or ``cat([negative, cond])`` with guidance.

    negative_default: "same" to reuse the conditional value when ``negative_<name>`` is missing (time ids,
    Flux guidance), None to require it.
    """
    if cond.get(name) is None:
        raise ValueError(f"missing conditioning {name!r}")
    pos = _batched(_as_tensor(cond[name], name, device, dtype), b, name, trailing)
    if not guided:
        return pos
    neg_name = f"negative_{name}"
    if cond.get(neg_name) is None:
        if negative_default != "same":
            raise ValueError(
                f"guidance is on (x has twice the batch of the conditioning): pass {neg_name!r}, the "
                f"unconditional (negative / empty-prompt) counterpart of {name!r}"
            )
        neg = pos
    else:
        neg = _batched(_as_tensor(cond[neg_name], neg_name, device, dtype), b, neg_name, trailing)
    if neg.shape != pos.shape:
        raise ValueError(
            f"{neg_name} has shape {tuple(neg.shape)} but {name} has {tuple(pos.shape)}; both halves run in "
            f"one batch, so they must match (pad the negative prompt to the same length)"
        )
    return torch.cat([neg, pos])


def _check_keys(cond: Mapping[str, Any], allowed: tuple[str, ...], model: str) -> None:
    unknown = sorted(set(cond) - set(allowed))
    if unknown:
        raise ValueError(f"{model}: unknown conditioning {unknown}; accepted: {', '.join(allowed)}")


def _out(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.to(x.dtype)


# -- adapters ------------------------------------------------------------------------------------------------
class _Adapter:
    """Base: holds the model; ``pipeline_spacing`` is None unless the pipeline's grid is special."""

    model_class = ""
    cond_keys: tuple[str, ...] = ()
    # the conditioning keywords every call needs (fs.compile checks ``cond=`` against it before warm-up)
    required_cond: tuple[str, ...] = ()

    def __init__(self, model: torch.nn.Module, scheduler_config: Mapping[str, Any] | None = None):
        self.model = model
        self.config = model.config
        self.scheduler_config = dict(scheduler_config or {})

    def pipeline_spacing(self, nfe: int, shape: tuple[int, ...]) -> Spacing | None:
        """The grid the model's diffusers pipeline uses for ``nfe`` steps on latents of ``shape``, or None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"


class DiTAdapter(_Adapter):
    """DiTTransformer2DModel as DiTPipeline runs it: class labels, null class, learned-sigma split."""

    model_class = "DiTTransformer2DModel"
    cond_keys = ("class_labels", "cross_attention_kwargs")
    required_cond = ("class_labels",)

    @property
    def null_class(self) -> int:
        return int(self.config.num_embeds_ada_norm)

    def check_cond(self, class_labels: Any) -> torch.Tensor:
        """Class labels as an int64 tensor; labels outside ``[0, num_classes)`` are rejected."""
        y = torch.as_tensor(class_labels)
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TypeError(f"class_labels must be integers, got {y.dtype}")
        y = y.reshape(-1).long()
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.null_class):
            raise ValueError(
                f"class labels must lie in [0, {self.null_class}) (the model's num_embeds_ada_norm); got "
                f"{sorted(set(y.tolist()))}"
            )
        return y

    @torch.no_grad()
    def __call__(
        self, x: torch.Tensor, t: Any, *, class_labels: Any, cross_attention_kwargs=None
    ) -> torch.Tensor:
        p = _param(self.model)
        y = self.check_cond(class_labels).to(x.device)
        guided, b = _guided(x, y.shape[0], "class_labels")
        if guided:
            y = torch.cat([torch.full_like(y, self.null_class), y])
        out = self.model(
            x.to(p.dtype),
            timestep=_time(t, x.shape[0], x.device),
            class_labels=y,
            cross_attention_kwargs=cross_attention_kwargs,
        ).sample
        c = self.config.in_channels
        if self.config.out_channels // 2 == c:  # learned sigma: DiTPipeline keeps the eps channels
            out = out[:, :c]
        return _out(out, x)


class UNetAdapter(_Adapter):
    """UNet2DConditionModel (SD1.5 / SD2 / SDXL): text embeddings, SDXL text_embeds + time_ids."""

    model_class = "UNet2DConditionModel"
    cond_keys = (
        "encoder_hidden_states",
        "negative_encoder_hidden_states",
        "text_embeds",
        "negative_text_embeds",
        "time_ids",
        "negative_time_ids",
        "timestep_cond",
        "class_labels",
        "cross_attention_kwargs",
    )

    @property
    def required_cond(self) -> tuple[str, ...]:
        sdxl = self.config.addition_embed_type == "text_time"
        return ("encoder_hidden_states",) + (("text_embeds", "time_ids") if sdxl else ())

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        _check_keys(cond, self.cond_keys, self.model_class)
        p = _param(self.model)
        if cond.get("encoder_hidden_states") is None:
            raise ValueError(
                "UNet2DConditionModel needs encoder_hidden_states (text embeddings, (B, tokens, dim))"
            )
        ehs = _as_tensor(cond["encoder_hidden_states"], "encoder_hidden_states", x.device, p.dtype)
        guided, b = _guided(x, ehs.shape[0], "encoder_hidden_states")
        kw: dict[str, Any] = {
            "encoder_hidden_states": _pair(cond, "encoder_hidden_states", b, guided, x.device, p.dtype)
        }
        if self.config.addition_embed_type == "text_time":  # SDXL
            missing = [k for k in ("text_embeds", "time_ids") if cond.get(k) is None]
            if missing:
                raise ValueError(
                    f"this UNet is SDXL-style (addition_embed_type='text_time'): pass {missing} "
                    f"(pooled text embeddings (B, dim) and size ids (B, 6))"
                )
            kw["added_cond_kwargs"] = {
                "text_embeds": _pair(cond, "text_embeds", b, guided, x.device, p.dtype),
                "time_ids": _pair(
                    cond, "time_ids", b, guided, x.device, p.dtype, negative_default="same", trailing=1
                ),
            }
        for k in ("timestep_cond", "class_labels"):  # same value for both halves
            if cond.get(k) is not None:
                v = _batched(_as_tensor(cond[k], k, x.device), b, k)
                kw[k] = torch.cat([v, v]) if guided else v
        if "timestep_cond" in kw:
            kw["timestep_cond"] = kw["timestep_cond"].to(p.dtype)
        out = self.model(
            x.to(p.dtype),
            _time(t, x.shape[0], x.device),
            cross_attention_kwargs=cond.get("cross_attention_kwargs"),
            **kw,
        ).sample
        return _out(out, x)


class _FlowAdapter(_Adapter):
    def _scheduler(self):
        import diffusers

        cfg = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)

    def _image_seq_len(self, shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def _mu(self, shape: tuple[int, ...]) -> float:
        """FluxPipeline / SD3 pipeline ``calculate_shift``: mu linear in the number of image tokens."""
        c = self.scheduler_config
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        return self._image_seq_len(shape) * m + (base_shift - m * base_len)

    def _pipeline_sigmas(self, nfe: int, shape: tuple[int, ...], sigmas=None) -> Spacing:
        sch = self._scheduler()
        mu = self._mu(shape) if sch.config.use_dynamic_shifting else None
        sch.set_timesteps(nfe, sigmas=sigmas, mu=mu)
        return Spacing("sigmas", values=tuple(float(s) for s in sch.sigmas))


class SD3Adapter(_FlowAdapter):
    """SD3Transformer2DModel as StableDiffusion3Pipeline runs it: flow prediction, pooled projections."""

    model_class = "SD3Transformer2DModel"
    cond_keys = (
        "encoder_hidden_states",
        "negative_encoder_hidden_states",
        "pooled_projections",
        "negative_pooled_projections",
        "joint_attention_kwargs",
    )
    required_cond = ("encoder_hidden_states", "pooled_projections")

    def _image_seq_len(self, shape):
        p = self.config.patch_size
        return (shape[-2] // p) * (shape[-1] // p)

    def pipeline_spacing(self, nfe, shape):
        """StableDiffusion3Pipeline: ``scheduler.set_timesteps(nfe)`` (with mu under dynamic shifting)."""
        return self._pipeline_sigmas(nfe, shape)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        _check_keys(cond, self.cond_keys, self.model_class)
        p = _param(self.model)
        for k in ("encoder_hidden_states", "pooled_projections"):
            if cond.get(k) is None:
                raise ValueError(f"SD3Transformer2DModel needs {k}")
        guided, b = _guided(
            x,
            _as_tensor(cond["encoder_hidden_states"], "encoder_hidden_states", x.device).shape[0],
            "encoder_hidden_states",
        )
        out = self.model(
            hidden_states=x.to(p.dtype),
            timestep=_time(t, x.shape[0], x.device),
            encoder_hidden_states=_pair(cond, "encoder_hidden_states", b, guided, x.device, p.dtype),
            pooled_projections=_pair(cond, "pooled_projections", b, guided, x.device, p.dtype),
            joint_attention_kwargs=cond.get("joint_attention_kwargs"),
        ).sample
        return _out(out, x)


class FluxAdapter(_FlowAdapter):
    """FluxTransformer2DModel as in FluxPipeline: packed 2x2 latents, position ids, guidance embedding."""

    model_class = "FluxTransformer2DModel"
    cond_keys = (
        "encoder_hidden_states",
        "negative_encoder_hidden_states",
        "pooled_projections",
        "negative_pooled_projections",
        "guidance",
        "txt_ids",
        "img_ids",
        "joint_attention_kwargs",
    )
    required_cond = ("encoder_hidden_states", "pooled_projections")

    def _image_seq_len(self, shape):
        return (shape[-2] // 2) * (shape[-1] // 2) if len(shape) == 4 else shape[1]

    def pipeline_spacing(self, nfe, shape):
        """FluxPipeline: sigmas ``linspace(1, 1/nfe, nfe)`` shifted by mu (from the packed token count)."""
        import numpy as np

        if self.scheduler_config.get("use_flow_sigmas"):
            return self._pipeline_sigmas(nfe, shape)
        return self._pipeline_sigmas(nfe, shape, sigmas=np.linspace(1.0, 1 / nfe, nfe))

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/2 * W/2, 4C), FluxPipeline._pack_latents."""
        b, c, h, w = x.shape
        return (
            x.view(b, c, h // 2, 2, w // 2, 2)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, (h // 2) * (w // 2), c * 4)
        )

    @staticmethod
    def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, H/2 * W/2, 4C) -> (B, C, H, W), FluxPipeline._unpack_latents."""
        b, _, c4 = x.shape
        return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        """Position ids of the packed (h/2, w/2) token grid, FluxPipeline._prepare_latent_image_ids."""
        ids = torch.zeros(h // 2, w // 2, 3, device=device)
        ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
        return ids.reshape(-1, 3).to(dtype)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        _check_keys(cond, self.cond_keys, self.model_class)
        p = _param(self.model)
        cfg = self.config
        for k in ("encoder_hidden_states", "pooled_projections"):
            if cond.get(k) is None:
                raise ValueError(f"FluxTransformer2DModel needs {k}")
        if x.ndim == 4:
            n, c, h, w = x.shape
            if c * 4 != cfg.in_channels or h % 2 or w % 2:
                raise ValueError(
                    f"Flux latents must be (B, {cfg.in_channels // 4}, H, W) with H, W even; got "
                    f"{tuple(x.shape)}"
                )
            tokens = self.pack(x.to(p.dtype))
            img_ids = self.image_ids(h, w, x.device, p.dtype)
        elif x.ndim == 3:
            if cond.get("img_ids") is None:
                raise ValueError(
                    "packed (B, tokens, channels) Flux latents need img_ids; or pass (B, C, H, W)"
                )
            tokens, img_ids = x.to(p.dtype), _as_tensor(cond["img_ids"], "img_ids", x.device, p.dtype)
        else:
            raise ValueError(
                f"Flux latents must be (B, C, H, W) or packed (B, tokens, channels), got {x.shape}"
            )
        ehs = _as_tensor(cond["encoder_hidden_states"], "encoder_hidden_states", x.device, p.dtype)
        guided, b = _guided(x, ehs.shape[0], "encoder_hidden_states")
        txt = cond.get("txt_ids")
        txt = (
            torch.zeros(ehs.shape[1], 3, device=x.device)
            if txt is None
            else _as_tensor(txt, "txt_ids", x.device)
        )
        guidance = None
        if cfg.guidance_embeds:
            if cond.get("guidance") is None:
                raise ValueError(
                    "this Flux model has guidance_embeds: pass guidance= (e.g. 3.5 for FLUX.1-dev)"
                )
            g = cond["guidance"]
            g = (
                torch.full((b,), float(g), device=x.device)
                if isinstance(g, (int, float))
                else _batched(_as_tensor(g, "guidance", x.device, torch.float32).reshape(-1), b, "guidance")
            )
            guidance = torch.cat([g, g]) if guided else g
        elif cond.get("guidance") is not None:
            raise ValueError(
                "guidance= was given but this Flux model has no guidance embedding (guidance_embeds="
                "False, e.g. FLUX.1-schnell); use the program's guidance_scale for CFG"
            )
        out = self.model(
            hidden_states=tokens,
            timestep=_time(t, x.shape[0], x.device) / 1000,
            guidance=guidance,
            encoder_hidden_states=_pair(cond, "encoder_hidden_states", b, guided, x.device, p.dtype),
            pooled_projections=_pair(cond, "pooled_projections", b, guided, x.device, p.dtype),
            txt_ids=txt.to(device=x.device, dtype=p.dtype),
            img_ids=img_ids,
            joint_attention_kwargs=cond.get("joint_attention_kwargs"),
        ).sample
        if x.ndim == 4:
            out = self.unpack(out, h, w)
        return _out(out, x)


_ADAPTERS: dict[str, type[_Adapter]] = {
    a.model_class: a for a in (DiTAdapter, UNetAdapter, SD3Adapter, FluxAdapter)
}
SUPPORTED_MODELS = tuple(_ADAPTERS)


# -- entry point ---------------------------------------------------------------------------------------------
def _scheduler_mapping(scheduler_config: Any) -> Mapping[str, Any]:
    if hasattr(scheduler_config, "config") and isinstance(scheduler_config.config, Mapping):
        return dict(scheduler_config.config, _class_name=type(scheduler_config).__name__)
    if isinstance(scheduler_config, Mapping):
        return dict(scheduler_config)
    raise TypeError(
        f"scheduler_config must be a diffusers scheduler, its .config, a dict or a fs.ModelSpec; got "
        f"{type(scheduler_config).__name__}"
    )


def _model_class(model: Any) -> str | None:
    """The supported diffusers class ``model`` is an instance of (subclasses count), else None."""
    try:
        import diffusers
    except ImportError:
        return None
    for name in SUPPORTED_MODELS:
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(model, cls):
            return name
    return None


def _is_diffusers_model(model: Any) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(model).__mro__)


def from_diffusers(model: Any, scheduler_config: Any = None) -> tuple[Callable[..., torch.Tensor], ModelSpec]:
    """``(fn, spec)`` for a diffusers denoiser: ``fn(x, t, **cond) -> raw network output``.

    model: a DiTTransformer2DModel, UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel
    (or a subclass; it is put in eval mode), or any callable ``model(x, t, **cond)`` (returned as is; it then
    needs ``scheduler_config``).
    scheduler_config: the pipeline's scheduler (or its ``.config``, a dict, or a ``fs.ModelSpec``); None: the
    model family's published default.  The module docstring says which conditioning each adapter takes and
    how guidance is handled.
    """
    name = _model_class(model)
    if isinstance(scheduler_config, ModelSpec):
        spec, cfg = scheduler_config, dict(scheduler_config.diffusers_config or {})
    else:
        cfg = None if scheduler_config is None else _scheduler_mapping(scheduler_config)
        spec = None
    if name is None:
        if _is_diffusers_model(model) or not callable(model):
            raise TypeError(
                f"unsupported model class {type(model).__name__}; supported diffusers models: "
                f"{', '.join(SUPPORTED_MODELS)} (or any callable model(x, t, **cond) with a scheduler_config)"
            )
        if spec is None and cfg is None:
            raise ValueError(
                f"a plain callable ({type(model).__name__}) needs scheduler_config (a diffusers "
                f"scheduler config or a fs.ModelSpec) to say what it predicts"
            )
        return model, spec if spec is not None else ModelSpec.from_diffusers_scheduler_config(cfg)
    if cfg is None or (spec is not None and not cfg):
        key = name
        if name == "FluxTransformer2DModel" and not model.config.guidance_embeds:
            key = "FluxTransformer2DModel/schnell"
        cfg = dict(DEFAULT_SCHEDULER_CONFIGS[key])
    if spec is None:
        spec = ModelSpec.from_diffusers_scheduler_config(cfg)
    flow_model = name in ("SD3Transformer2DModel", "FluxTransformer2DModel")
    if flow_model != (spec.prediction == "flow"):
        kind = "a rectified-flow (velocity)" if flow_model else "a diffusion (not flow-matching)"
        raise ValueError(f"{name} is {kind} model; the scheduler config gives {spec.describe()}")
    model.eval()  # dropout off (DiT's label embedding drops classes in training mode)
    return _ADAPTERS[name](model, cfg), spec
