"""Whole-plan export of diffusers networks (tiny random models of the real classes): a DiT with class labels,
a UNet2DCondition with encoder_hidden_states, SD3 and Flux transformers with text and pooled embeddings;
onnxruntime equals the torch plan with guidance on and off."""

import pytest
import torch

import fewstep as fs
from tests.models.test_adapters import tiny_dit, tiny_flux, tiny_sd3, tiny_unet

from .conftest import randn, rel_err

TOL = 1e-4


def _check(model_and_spec, solver, shape, cond, guidance, tmp_path, nfe=3, spacing=None):
    fn, spec = model_and_spec
    plan = fs.compile(fn, spec, solver=solver, nfe=nfe, shape=shape, guidance_scale=guidance, device="cpu",
                      cond=cond, cuda_graph=False, spacing=spacing)
    report = plan.export_onnx(tmp_path / "plan.onnx")
    assert set(report.inputs) == {"noise", *cond}
    ort_plan = fs.load_onnx(tmp_path / "plan.onnx")
    noise = randn(*shape, seed=1)
    ref = plan(noise, **cond)
    assert rel_err(ort_plan(noise, **cond), ref) <= TOL
    return plan, ort_plan, noise


@pytest.mark.parametrize("solver,guidance", [("dpmpp_2m", 4.0), ("unipc", None)])
def test_dit_class_labels(solver, guidance, tmp_path):
    model = fs.models.from_diffusers(tiny_dit())
    cond = {"class_labels": torch.tensor([1, 999])}
    plan, ort_plan, noise = _check(model, solver, (2, 4, 8, 8), cond, guidance, tmp_path)
    other = {"class_labels": torch.tensor([5, 6])}  # labels are an input: other labels, the plan's sample
    assert rel_err(ort_plan(noise, **other), plan(noise, **other)) <= TOL


@pytest.mark.parametrize("solver,guidance", [("euler", 7.5), ("deis", None)])
def test_unet_encoder_hidden_states(solver, guidance, tmp_path):
    model = fs.models.from_diffusers(tiny_unet())
    cond = {"encoder_hidden_states": randn(2, 5, 24, seed=2)}
    if guidance:
        cond["negative_encoder_hidden_states"] = randn(2, 5, 24, seed=3)
    plan, ort_plan, noise = _check(model, solver, (2, 4, 8, 8), cond, guidance, tmp_path)
    other = dict(cond, encoder_hidden_states=randn(2, 5, 24, seed=4))
    assert rel_err(ort_plan(noise, **other), plan(noise, **other)) <= TOL
    assert rel_err(plan(noise, **other), plan(noise, **cond)) > 1e-3  # the text input matters


@pytest.mark.parametrize("solver,guidance", [("flow_euler", 5.0), ("unipc", None)])
def test_sd3_text_and_pooled(solver, guidance, tmp_path):
    model = fs.models.from_diffusers(tiny_sd3())
    cond = {"encoder_hidden_states": randn(1, 6, 24, seed=5), "pooled_projections": randn(1, 12, seed=6)}
    if guidance:
        cond.update(negative_encoder_hidden_states=randn(1, 6, 24, seed=7),
                    negative_pooled_projections=randn(1, 12, seed=8))
    _check(model, solver, (1, 4, 8, 8), cond, guidance, tmp_path)


def test_flux_packed_latents(tmp_path):
    fn, spec = fs.models.from_diffusers(tiny_flux(guidance_embeds=True))
    shape = (1, 4, 4, 4)
    cond = {"encoder_hidden_states": randn(1, 6, 24, seed=9), "pooled_projections": randn(1, 12, seed=10),
            "guidance": torch.tensor([3.5])}
    _check((fn, spec), "flow_euler", shape, cond, None, tmp_path, spacing=fn.pipeline_spacing(3, shape))
