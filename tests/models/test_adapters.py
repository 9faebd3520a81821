"""Adapters vs the diffusers pipelines' own denoising loops (tiny random models, float32, guidance on).

Each ``*_pipeline_loop`` below is the denoising loop of the named diffusers pipeline, copied statement by
statement (text encoders and VAE left out: the embeddings are random tensors and the loops return latents).
fewstep samples the same model with ``fs.solvers.build`` + ``run_reference`` through the adapter; the samples
must agree to float32 rounding, and the time inputs the network saw must be the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fewstep as fs
import fewstep.models
from fewstep.models import from_diffusers
from fewstep.models.diffusers_adapters import FluxAdapter

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # relative L2 error between two float32 runs of the same computation in different op orders


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/Inf in a sample"
    return float((a.double() - b.double()).norm() / b.double().norm())


def _seeded(cls, seed: int, **config) -> torch.nn.Module:
    """``cls(**config)`` with seeded random weights everywhere (diffusers zero-initializes some output
    layers): the same on every call, leaving the global RNG alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p + 0.1 * noise if p.ndim == 1 else noise * (0.5 / p[0].numel() ** 0.5))
    return model.eval()


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class TimeRecorder:
    """Forward pre-hook recording the timestep tensor the network receives (a copy per call)."""

    def __init__(self, model: torch.nn.Module):
        self.seen: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = torch.as_tensor(t)
        self.seen.append(t.float().reshape(-1)[:1].clone())

    def take(self) -> torch.Tensor:
        out, self.seen = torch.cat(self.seen), []
        return out


def _cases(*cases: tuple) -> list[tuple]:
    """Parametrize cases whose solver (first item) is registered."""
    have = set(fs.solvers.available())
    return [c for c in cases if c[0] in have]


def _halves_differ(fn, x, t, **cond) -> float:
    """How much the unconditional and conditional halves differ (guards against a vacuous comparison)."""
    u, c = fn(torch.cat([x, x]), t, **cond).chunk(2)
    return rel_err(u, c)


def _run_fewstep(fn, spec, solver, nfe, noise, guidance, cond, spacing=None):
    prog = fs.solvers.build(solver, spec, nfe, spacing, guidance_scale=guidance)
    out = fs.solvers.run_reference(prog, lambda x, t: fn(x, t, **cond), noise, dtype=torch.float32)
    return out, prog


# -- DiT -----------------------------------------------------------------------------------------------------
def tiny_dit() -> torch.nn.Module:
    return _seeded(
        diffusers.DiTTransformer2DModel,
        0,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )


@torch.no_grad()
def dit_pipeline_loop(transformer, scheduler, class_labels, guidance_scale, num_inference_steps, latents):
    """DiTPipeline.__call__ (diffusers 0.42), from the latents to the latents before the VAE."""
    latent_channels = transformer.config.in_channels
    batch_size = len(class_labels)
    latent_model_input = torch.cat([latents] * 2) if guidance_scale > 1 else latents
    class_labels = torch.tensor(class_labels).reshape(-1)
    class_null = torch.tensor([1000] * batch_size)
    class_labels_input = torch.cat([class_labels, class_null], 0) if guidance_scale > 1 else class_labels
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        if guidance_scale > 1:
            half = latent_model_input[: len(latent_model_input) // 2]
            latent_model_input = torch.cat([half, half], dim=0)
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        timesteps = t
        if len(timesteps.shape) == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(latent_model_input.shape[0])
        noise_pred = transformer(
            latent_model_input, timestep=timesteps, class_labels=class_labels_input
        ).sample
        if guidance_scale > 1:
            eps, rest = noise_pred[:, :latent_channels], noise_pred[:, latent_channels:]
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
            eps = torch.cat([half_eps, half_eps], dim=0)
            noise_pred = torch.cat([eps, rest], dim=1)
        if transformer.config.out_channels // 2 == latent_channels:
            model_output, _ = torch.split(noise_pred, latent_channels, dim=1)
        else:
            model_output = noise_pred
        latent_model_input = scheduler.step(model_output, t, latent_model_input).prev_sample
    if guidance_scale > 1:
        latents, _ = latent_model_input.chunk(2, dim=0)
    else:
        latents = latent_model_input
    return latents


# DiTPipeline steps from the scaled model input and never applies init_noise_sigma: it is only right (and only
# comparable) with schedulers whose scale_model_input is the identity and init_noise_sigma 1 (asserted below)
@pytest.mark.parametrize(
    "solver,guidance", _cases(("ddim", 4.0), ("dpmpp_2m", 4.0), ("unipc", 1.5), ("ddim", None))
)
@torch.no_grad()
def test_dit_matches_pipeline(solver, guidance):
    model = tiny_dit()
    _, default = from_diffusers(model)
    scheduler = fs.solvers.to_diffusers(solver, default)
    fn, spec = from_diffusers(model, scheduler)
    labels = [3, 917, 0]
    noise = _randn(3, 4, 8, 8, seed=1)
    nfe = 4
    rec = TimeRecorder(model)
    ref = dit_pipeline_loop(model, scheduler, labels, guidance or 1.0, nfe, noise)
    ref_t = rec.take()
    assert scheduler.init_noise_sigma == 1.0 and fn.pipeline_spacing(nfe, noise.shape) is None
    ours, prog = _run_fewstep(fn, spec, solver, nfe, noise, guidance, {"class_labels": torch.tensor(labels)})
    assert prog.nfe == nfe
    assert torch.equal(rec.take(), ref_t)
    assert rel_err(ours, ref) <= TOL
    assert _halves_differ(fn, noise, 500.0, class_labels=torch.tensor(labels)) > 1e-2


@pytest.mark.skipif("dpmpp_2m" not in fs.solvers.available(), reason="needs the dpmpp_2m solver")
def test_dit_plan_matches_pipeline():
    """The same proof through a compiled plan (CPU, eager): the adapter is the plan's network contract."""
    model = tiny_dit()
    scheduler = fs.solvers.to_diffusers("dpmpp_2m", from_diffusers(model)[1])
    fn, spec = from_diffusers(model, scheduler)
    labels = torch.tensor([7, 1])
    noise = _randn(2, 4, 8, 8, seed=30)
    ref = dit_pipeline_loop(model, scheduler, labels.tolist(), 3.0, 5, noise)
    plan = fs.compile(
        fn,
        spec,
        solver="dpmpp_2m",
        nfe=5,
        shape=noise.shape,
        guidance_scale=3.0,
        device="cpu",
        cuda_graph=False,
        cond={"class_labels": labels},
    )
    assert rel_err(plan(noise, class_labels=labels), ref) <= TOL


@torch.no_grad()
def test_dit_adapter_output_and_labels():
    model = tiny_dit()
    fn, spec = from_diffusers(model)
    assert spec.prediction == "epsilon" and spec.schedule.kind == "vp"
    x = _randn(2, 4, 8, 8, seed=2)
    y = torch.tensor([5, 6])
    out = fn(x, 999.0, class_labels=y)
    assert out.shape == x.shape  # learned-sigma channels dropped
    full = model(x, timestep=torch.full((2,), 999.0), class_labels=y).sample[:, :4]
    assert torch.equal(out, full)
    # the unconditional half gets the null class from the config
    u, c = fn(torch.cat([x, x]), torch.full((4,), 999.0), class_labels=y).chunk(2)
    assert torch.allclose(c, out, rtol=1e-5, atol=1e-6)
    null = model(x, timestep=torch.full((2,), 999.0), class_labels=torch.tensor([1000, 1000])).sample[:, :4]
    assert torch.allclose(u, null, rtol=1e-5, atol=1e-6)
    assert torch.equal(fn(x.double(), 999, class_labels=[5, 6]), out.double())
    # a bf16 model: the adapter feeds it bf16 and hands back the caller's dtype
    fn16, _ = from_diffusers(tiny_dit().to(torch.bfloat16))
    out16 = fn16(x, 999.0, class_labels=y)
    assert out16.dtype == torch.float32 and 0 < rel_err(out16, out) < 0.05
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        fn(x, 10.0, class_labels=torch.tensor([5, 1000]))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        fn(x, 10.0, class_labels=torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="integers"):
        fn(x, 10.0, class_labels=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="batch 3"):
        fn(x, 10.0, class_labels=torch.tensor([1, 2, 3]))


# -- UNet2DCondition (SD1.5 / SD2 / SDXL) --------------------------------------------------------------------
def tiny_unet(sdxl: bool = False) -> torch.nn.Module:
    kw = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if sdxl:
        kw.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            use_linear_projection=True,
            projection_class_embeddings_input_dim=4 * 6 + 20,
        )
    return _seeded(diffusers.UNet2DConditionModel, 3, **kw)


@torch.no_grad()
def sd_pipeline_loop(
    unet,
    scheduler,
    prompt_embeds,
    negative_prompt_embeds,
    guidance_scale,
    num_inference_steps,
    latents,
    added=None,
):
    """StableDiffusionPipeline / StableDiffusionXLPipeline.__call__ denoising (diffusers 0.42), latents out.

    added: SDXL ``(add_text_embeds, negative_pooled, add_time_ids (1, 6))``.
    """
    do_cfg = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
    batch_size = prompt_embeds.shape[0]
    if do_cfg:
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    added_cond_kwargs = None
    if added is not None:
        add_text_embeds, negative_pooled, add_time_ids = added
        negative_add_time_ids = add_time_ids
        if do_cfg:
            add_text_embeds = torch.cat([negative_pooled, add_text_embeds], dim=0)
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids], dim=0)
        add_time_ids = add_time_ids.repeat(batch_size, 1)
        added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
    scheduler.set_timesteps(num_inference_steps)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = unet(
            latent_model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize(
    "solver,pred",
    _cases(
        ("euler", "epsilon"), ("ddim", "v_prediction"), ("dpmpp_2m", "epsilon"), ("unipc", "v_prediction")
    ),
)
@torch.no_grad()
def test_sd_unet_matches_pipeline(solver, pred):
    unet = tiny_unet()
    base = fs.ModelSpec.from_diffusers_scheduler_config(
        dict(
            fewstep.models.diffusers_adapters.DEFAULT_SCHEDULER_CONFIGS["UNet2DConditionModel"],
            prediction_type=pred,
        )
    )
    scheduler = fs.solvers.to_diffusers(solver, base)
    fn, spec = from_diffusers(unet, scheduler)
    assert spec.prediction == pred
    pe, ne = _randn(2, 5, 24, seed=4), _randn(2, 5, 24, seed=5)
    noise = _randn(2, 4, 8, 8, seed=6)
    rec = TimeRecorder(unet)
    ref = sd_pipeline_loop(unet, scheduler, pe, ne, 7.5, 4, noise)
    ref_t = rec.take()
    cond = {"encoder_hidden_states": pe, "negative_encoder_hidden_states": ne}
    ours, _ = _run_fewstep(fn, spec, solver, 4, noise, 7.5, cond)
    assert torch.equal(rec.take(), ref_t)
    assert rel_err(ours, ref) <= TOL
    assert _halves_differ(fn, noise, 500.0, **cond) > 1e-2


@torch.no_grad()
def test_sdxl_unet_matches_pipeline():
    unet = tiny_unet(sdxl=True)
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    fn, spec = from_diffusers(unet, scheduler)
    pe, ne = _randn(2, 5, 24, seed=7), _randn(2, 5, 24, seed=8)
    pooled, npooled = _randn(2, 20, seed=9), _randn(2, 20, seed=10)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    noise = _randn(2, 4, 8, 8, seed=11)
    ref = sd_pipeline_loop(unet, scheduler, pe, ne, 5.0, 3, noise, added=(pooled, npooled, time_ids))
    cond = {
        "encoder_hidden_states": pe,
        "negative_encoder_hidden_states": ne,
        "text_embeds": pooled,
        "negative_text_embeds": npooled,
        "time_ids": time_ids[0],
    }
    ours, _ = _run_fewstep(fn, spec, "euler", 3, noise, 5.0, cond)
    assert rel_err(ours, ref) <= TOL
    assert _halves_differ(fn, noise, 500.0, **cond) > 1e-2
    with pytest.raises(ValueError, match="text_embeds"):
        fn(noise, 10.0, encoder_hidden_states=pe)


@torch.no_grad()
def test_unet_guidance_needs_negatives():
    unet = tiny_unet()
    fn, spec = from_diffusers(unet)
    assert spec.prediction == "epsilon" and spec.schedule.beta_schedule == "scaled_linear"
    x, pe = _randn(2, 4, 8, 8, seed=12), _randn(1, 5, 24, seed=13)
    with pytest.raises(ValueError, match="negative_encoder_hidden_states"):
        fn(x, 10.0, encoder_hidden_states=pe)
    with pytest.raises(ValueError, match="must match"):
        fn(x, 10.0, encoder_hidden_states=pe, negative_encoder_hidden_states=_randn(1, 7, 24, seed=1))
    with pytest.raises(ValueError, match="unknown conditioning"):
        fn(x, 10.0, encoder_hidden_states=pe, prompt_embeds=pe)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        fn(x, 10.0)
    # a full-batch conditioning is used as given (the caller stacked [uncond; cond] itself)
    ne = _randn(1, 5, 24, seed=14)
    both = fn(x, 10.0, encoder_hidden_states=torch.cat([ne, pe]))
    assert torch.equal(both, fn(x, 10.0, encoder_hidden_states=pe[:1], negative_encoder_hidden_states=ne))


# -- SD3 -----------------------------------------------------------------------------------------------------
def tiny_sd3() -> torch.nn.Module:
    return _seeded(
        diffusers.SD3Transformer2DModel,
        15,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=8,
    )


@torch.no_grad()
def flow_pipeline_loop(
    transformer, scheduler, cond, neg, guidance_scale, latents, set_timesteps_kwargs, flux=None
):
    """StableDiffusion3Pipeline.__call__ denoising (diffusers 0.42); with ``flux``, FluxPipeline's (true CFG
    when ``guidance_scale > 1``; ``flux = (guidance, text_ids, latent_image_ids)``).

    cond, neg: (embeds, pooled).
    """
    scheduler.set_timesteps(**set_timesteps_kwargs)
    if flux is None:
        do_cfg = guidance_scale > 1
        prompt_embeds, pooled = (
            (torch.cat([neg[0], cond[0]]), torch.cat([neg[1], cond[1]])) if do_cfg else cond
        )
        for t in scheduler.timesteps:
            latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
            timestep = t.expand(latent_model_input.shape[0])
            noise_pred = transformer(
                hidden_states=latent_model_input,
                timestep=timestep,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
            if do_cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents
    guidance, text_ids, latent_image_ids = flux
    do_true_cfg = guidance_scale > 1
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        noise_pred = transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=cond[1],
            encoder_hidden_states=cond[0],
            txt_ids=text_ids,
            img_ids=latent_image_ids,
            return_dict=False,
        )[0]
        if do_true_cfg:
            neg_noise_pred = transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=neg[1],
                encoder_hidden_states=neg[0],
                txt_ids=text_ids,
                img_ids=latent_image_ids,
                return_dict=False,
            )[0]
            noise_pred = neg_noise_pred + guidance_scale * (noise_pred - neg_noise_pred)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


# a flow solver's own grid from the scheduler config, or the adapter's pipeline grid (needed by generic
# solvers, which do not shift twice as FlowMatchEulerDiscreteScheduler does, and by dynamic shifting)
@pytest.mark.parametrize(
    "solver,shift_cfg,pipeline_grid",
    _cases(
        ("flow_euler", dict(shift=3.0), False),
        ("euler", dict(shift=3.0), True),
        ("euler", dict(use_dynamic_shifting=True, shift=1.0), True),
    ),
)
@torch.no_grad()
def test_sd3_matches_pipeline(solver, shift_cfg, pipeline_grid):
    model = tiny_sd3()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**shift_cfg)
    fn, spec = from_diffusers(model, scheduler)
    assert spec.prediction == "flow"
    cond = (_randn(2, 6, 24, seed=16), _randn(2, 12, seed=17))
    neg = (_randn(2, 6, 24, seed=18), _randn(2, 12, seed=19))
    noise = _randn(2, 4, 8, 8, seed=20)
    nfe = 4
    kw = {"num_inference_steps": nfe}
    if shift_cfg.get("use_dynamic_shifting"):  # SD3 pipeline: mu from (H / patch) * (W / patch) tokens
        c = scheduler.config
        kw["mu"] = calculate_shift(
            (8 // 2) * (8 // 2),
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.16),
        )
    rec = TimeRecorder(model)
    ref = flow_pipeline_loop(model, scheduler, cond, neg, 6.0, noise, kw)
    ref_t = rec.take()
    c = {
        "encoder_hidden_states": cond[0],
        "pooled_projections": cond[1],
        "negative_encoder_hidden_states": neg[0],
        "negative_pooled_projections": neg[1],
    }
    spacing = fn.pipeline_spacing(nfe, noise.shape) if pipeline_grid else None
    ours, prog = _run_fewstep(fn, spec, solver, nfe, noise, 6.0, c, spacing=spacing)
    assert torch.equal(rec.take(), ref_t)
    assert rel_err(ours, ref) <= TOL
    assert _halves_differ(fn, noise, 500.0, **c) > 1e-2


# -- Flux ----------------------------------------------------------------------------------------------------
def tiny_flux(guidance_embeds: bool = True) -> torch.nn.Module:
    return _seeded(
        diffusers.FluxTransformer2DModel,
        21,
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )


# FluxPipeline's helpers, copied (importing diffusers' pipelines needs transformers, which the tests do not)
def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    mu = image_seq_len * m + b
    return mu


def _prepare_latent_image_ids(batch_size, height, width, device, dtype):
    latent_image_ids = torch.zeros(height, width, 3)
    latent_image_ids[..., 1] = latent_image_ids[..., 1] + torch.arange(height)[:, None]
    latent_image_ids[..., 2] = latent_image_ids[..., 2] + torch.arange(width)[None, :]
    latent_image_id_height, latent_image_id_width, latent_image_id_channels = latent_image_ids.shape
    latent_image_ids = latent_image_ids.reshape(
        latent_image_id_height * latent_image_id_width, latent_image_id_channels
    )
    return latent_image_ids.to(device=device, dtype=dtype)


def _pack_latents(latents, batch_size, num_channels_latents, height, width):
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    latents = latents.reshape(batch_size, (height // 2) * (width // 2), num_channels_latents * 4)
    return latents


def _unpack_latents(latents, height, width, vae_scale_factor):
    batch_size, num_patches, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    latents = latents.reshape(batch_size, channels // (2 * 2), height, width)
    return latents


@pytest.mark.parametrize("true_cfg", [3.0, None])
@torch.no_grad()
def test_flux_matches_pipeline(true_cfg):
    model = tiny_flux()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    fn, spec = from_diffusers(model, scheduler)
    b, h, w, nfe = 2, 8, 6, 4
    noise = _randn(b, 4, h, w, seed=22)  # what FluxPipeline.prepare_latents draws, before packing
    cond = (_randn(b, 5, 24, seed=23), _randn(b, 12, seed=24))
    neg = (_randn(b, 5, 24, seed=25), _randn(b, 12, seed=26))
    # FluxPipeline: pack, ids, sigmas linspace(1, 1/n, n) with mu from the packed sequence length
    latents = _pack_latents(noise, b, 4, h, w)
    img_ids = _prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    text_ids = torch.zeros(cond[0].shape[1], 3)
    mu = calculate_shift(latents.shape[1], 256, 4096, 0.5, 1.15)
    guidance = torch.full([1], 3.5, dtype=torch.float32).expand(b)
    kw = dict(num_inference_steps=nfe, sigmas=np.linspace(1.0, 1 / nfe, nfe), mu=mu)
    rec = TimeRecorder(model)
    ref = flow_pipeline_loop(
        model, scheduler, cond, neg, true_cfg or 1.0, latents, kw, flux=(guidance, text_ids, img_ids)
    )
    ref_t = rec.take()
    ref = _unpack_latents(ref, h * 8, w * 8, 8)
    c = {
        "encoder_hidden_states": cond[0],
        "pooled_projections": cond[1],
        "guidance": 3.5,
        "negative_encoder_hidden_states": neg[0],
        "negative_pooled_projections": neg[1],
    }
    ours, prog = _run_fewstep(
        fn, spec, "flow_euler", nfe, noise, true_cfg, c, spacing=fn.pipeline_spacing(nfe, noise.shape)
    )
    seen = rec.take()
    if true_cfg:  # the pipeline calls twice per step (cond, then uncond); fewstep once on 2B
        ref_t = ref_t[::2]
    assert torch.equal(seen, ref_t)
    assert rel_err(ours, ref) <= TOL
    assert _halves_differ(fn, noise, 500.0, **c) > 1e-2
    # the guidance embedding is live: a different distilled guidance gives a different output
    assert rel_err(fn(noise, 500.0, **dict(c, guidance=1.0)), fn(noise, 500.0, **c)) > 1e-3


@torch.no_grad()
def test_flux_packing_and_errors():
    model = tiny_flux()
    fn, spec = from_diffusers(model)
    assert spec.prediction == "flow"
    x = _randn(1, 4, 4, 6, seed=27)
    packed = FluxAdapter.pack(x)
    assert packed.shape == (1, 6, 16)
    assert torch.equal(FluxAdapter.unpack(packed, 4, 6), x)
    assert torch.equal(packed, _pack_latents(x, 1, 4, 4, 6))
    ehs, pooled = _randn(1, 5, 24, seed=28), _randn(1, 12, seed=29)
    ids = FluxAdapter.image_ids(4, 6, "cpu", torch.float32)
    assert torch.equal(ids, _prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32))
    out4 = fn(x, 700.0, encoder_hidden_states=ehs, pooled_projections=pooled, guidance=3.5)
    out3 = fn(packed, 700.0, encoder_hidden_states=ehs, pooled_projections=pooled, guidance=3.5, img_ids=ids)
    assert torch.equal(FluxAdapter.pack(out4), out3)
    with pytest.raises(ValueError, match="guidance"):
        fn(x, 700.0, encoder_hidden_states=ehs, pooled_projections=pooled)
    with pytest.raises(ValueError, match="H, W even"):
        fn(
            _randn(1, 4, 5, 6, seed=1),
            700.0,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            guidance=3.5,
        )
    with pytest.raises(ValueError, match="img_ids"):
        fn(packed, 700.0, encoder_hidden_states=ehs, pooled_projections=pooled, guidance=3.5)
    schnell_fn, schnell_spec = from_diffusers(tiny_flux(guidance_embeds=False))
    assert schnell_spec.schedule.shift == 1.0
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell_fn(x, 700.0, encoder_hidden_states=ehs, pooled_projections=pooled, guidance=3.5)


# -- entry point ---------------------------------------------------------------------------------------------
def test_plain_callable_and_errors():
    def net(x, t, scale=1.0):
        return x * scale + t

    cfg = {
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "v_prediction",
    }
    fn, spec = from_diffusers(net, cfg)
    assert fn is net and spec.prediction == "v_prediction"
    given = fs.ModelSpec(fs.schedules.Flow(shift=2.0), "flow")
    assert from_diffusers(net, given)[1] == given
    with pytest.raises(ValueError, match="scheduler_config"):
        from_diffusers(net)
    with pytest.raises(TypeError, match="DiTTransformer2DModel, UNet2DConditionModel"):
        from_diffusers(
            diffusers.UNet2DModel(
                block_out_channels=(8, 8),
                norm_num_groups=4,
                sample_size=8,
                down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2,
            )
        )
    with pytest.raises(TypeError, match="supported"):
        from_diffusers(42)
    with pytest.raises(ValueError, match="flow"):
        from_diffusers(tiny_sd3(), {"beta_schedule": "linear"})
    with pytest.raises(TypeError, match="scheduler_config"):
        from_diffusers(tiny_dit(), 3.0)
