"""fs.compile(..., quant=...): quantize before capture, static calibration on the timesteps, save/load."""

import pytest
import torch

import fewstep as fs

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("triton")

from fewstep.quant import quantized_layers  # noqa: E402

from ..kernels.fp8_util import sqnr_db  # noqa: E402
from .test_quantize import tiny_dit  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EMU = "fp8-emulated"
SHAPE = (2, 4, 8, 8)


def _compile(model, nfe=4, guidance_scale=2.0, **kw):
    fn, spec = fs.models.from_diffusers(model)
    y = torch.tensor([3, 7], device=DEV)
    plan = fs.compile(
        fn,
        spec,
        solver="euler",
        nfe=nfe,
        shape=SHAPE,
        device=DEV,
        guidance_scale=guidance_scale,
        cond={"class_labels": y},
        **kw,
    )
    return plan, y


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.fixture(scope="module")
def reference():
    plan, y = _compile(tiny_dit())
    return plan(_noise(), class_labels=y)


def test_fp8_plan_close_to_unquantized(reference):
    model = tiny_dit()
    plan, y = _compile(model, quant=EMU)
    assert len(quantized_layers(model)) == 8
    out = plan(_noise(), class_labels=y)
    assert sqnr_db(out, reference) >= 25.0


def test_static_calibration_over_the_plan_timesteps(reference):
    model = tiny_dit()
    plan, y = _compile(
        model, quant=EMU, quant_options={"activation_scales": "static", "calibration_inputs": 2}
    )
    layers = quantized_layers(model)
    assert all(m.static for m in layers.values())
    assert all(m.observer is None for m in layers.values())
    out = plan(_noise(), class_labels=y)
    assert sqnr_db(out, reference) >= 20.0


def test_percentile_mean_calibration():
    model = tiny_dit()
    _compile(
        model,
        quant=EMU,
        quant_options={
            "activation_scales": "static",
            "calibration_inputs": 1,
            "method": "percentile",
            "percentile": 99.0,
            "combine": "mean",
        },
    )
    model2 = tiny_dit()
    _compile(model2, quant=EMU, quant_options={"activation_scales": "static", "calibration_inputs": 1})
    a = [m.act_scale.item() for m in quantized_layers(model).values()]
    b = [m.act_scale.item() for m in quantized_layers(model2).values()]
    assert all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))  # tighter than absmax/max


def test_save_load_needs_no_calibration(tmp_path, monkeypatch):
    model = tiny_dit()
    plan, y = _compile(
        model, quant=EMU, quant_options={"activation_scales": "static", "calibration_inputs": 1}
    )
    out = plan(_noise(1), class_labels=y)
    plan.save(tmp_path / "p.pt")
    import fewstep.engine.quantized as qp

    monkeypatch.setattr(qp, "quantize_for_plan", None)  # load must not calibrate
    fresh = tiny_dit()
    fn, _ = fs.models.from_diffusers(fresh)
    loaded = fs.load(tmp_path / "p.pt", fn, device=DEV)
    assert torch.equal(loaded(_noise(1), class_labels=y), out)
    scales = [m.act_scale for m in quantized_layers(fresh).values()]
    assert all(s is not None for s in scales)


def test_triton_plan_matches_emulated():
    a, y = _compile(tiny_dit(), nfe=2, guidance_scale=None, quant="fp8")  # the interpreter is slow: 2 calls
    b, _ = _compile(tiny_dit(), nfe=2, guidance_scale=None, quant=EMU)
    assert sqnr_db(a(_noise(), class_labels=y), b(_noise(), class_labels=y)) >= 40.0
    assert a.quant_state()["layers"]["transformer_blocks.0.attn1.to_qkv"]["configs"]  # resolved, saved


def test_bad_quant_input():
    with pytest.raises(ValueError, match="known modes"):
        _compile(tiny_dit(), quant="int3")
    with pytest.raises(ValueError, match="unknown quant_options"):
        _compile(tiny_dit(), quant=EMU, quant_options={"bits": 4})
    with pytest.raises(ValueError, match="activation_scales"):
        _compile(tiny_dit(), quant=EMU, quant_options={"activation_scales": "per-channel"})
    with pytest.raises(ValueError, match="without quant"):
        _compile(tiny_dit(), quant_options={"activation_scales": "static"})


def test_plain_function_warns_and_runs():
    spec = fs.models.digits_spec()
    with pytest.warns(UserWarning, match="nothing to quantize"):
        plan = fs.compile(
            lambda x, t: 0.1 * x, spec, solver="euler", nfe=2, shape=(1, 1, 4, 4), device=DEV, quant=EMU
        )
    assert torch.isfinite(plan(torch.randn(1, 1, 4, 4, device=DEV))).all()


def test_second_plan_reuses_the_quantized_model():
    model = tiny_dit()
    a, y = _compile(model, quant=EMU)
    layers = quantized_layers(model)
    b, _ = _compile(model, quant=EMU)  # another shape bucket / solver on the same network: no re-quantization
    assert quantized_layers(model) == layers
    assert torch.equal(a(_noise(), class_labels=y), b(_noise(), class_labels=y))
    with pytest.raises(ValueError, match="already quantized"):
        _compile(model, quant=EMU, quant_options={"fuse_qkv": False})
    with pytest.raises(ValueError, match="already quantized"):
        fs.quantize(model, EMU)


def test_engine_passes_quant_to_every_plan():
    model = tiny_dit()
    fn, spec = fs.models.from_diffusers(model)
    ref_fn, _ = fs.models.from_diffusers(tiny_dit())
    eng = fs.Engine(fn, spec, solver="euler", nfe=3, guidance_scale=2.0, quant=EMU)
    ref = fs.Engine(ref_fn, spec, solver="euler", nfe=3, guidance_scale=2.0)
    for batch in (2, 3):
        y = torch.arange(batch, device=DEV)
        noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(batch)).to(DEV)
        out, want = eng(noise, class_labels=y), ref(noise, class_labels=y)
        assert torch.isfinite(out).all() and sqnr_db(out, want) >= 25.0
    assert len(eng.plans) == 2 and len(quantized_layers(model)) == 8  # quantized once, two shapes


def test_engine_rejects_unknown_quant_mode_up_front():
    fn, spec = fs.models.from_diffusers(tiny_dit())
    with pytest.raises(ValueError, match="known modes"):
        fs.Engine(fn, spec, solver="euler", nfe=3, quant="int3")
