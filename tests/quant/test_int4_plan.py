"""fs.quantize / fs.compile / fs.Engine with quant="int4" | "w4a8" | "int4-emulated": skip rules, bad input,
AWQ over the plan's timesteps, save / load of packed weights without calibrating."""

import logging

import pytest
import torch

import fewstep as fs

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("triton")

from fewstep.kernels.int4_gemm import dequantize_int4_ref  # noqa: E402
from fewstep.quant import INT4Linear, quantized_layers  # noqa: E402

from ..kernels.fp8_util import sqnr_db  # noqa: E402
from ..kernels.int4_util import floor_db, tf32  # noqa: E402
from .test_quantize import _dit_inputs, _dit_out, tiny_dit, tiny_unet  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (2, 4, 8, 8)
OPTS = {"group_size": 32}  # tiny_dit's projections are 32 wide


def test_dit_layers_follow_the_skip_list_and_the_group_size(caplog):
    m = tiny_dit()
    with caplog.at_level(logging.INFO, logger="fewstep.quant"):
        report = fs.quantize(m, "int4-emulated", group_size=32)
    layers = quantized_layers(m)
    assert layers and all(isinstance(x, INT4Linear) for x in layers.values())
    assert sorted(report.quantized) == sorted(layers)
    assert all(".norm1." not in n and "proj_out" not in n and "pos_embed" not in n for n in layers)
    assert any(n.endswith("to_qkv") for n in layers)  # q/k/v fused before quantization
    assert any(x.activation == "gelu_tanh" for x in layers.values())  # GELU in the epilogue
    assert "INT4 layers" in str(report)
    m2 = tiny_dit()
    report = fs.quantize(m2, "int4-emulated", group_size=64)  # K = 32 projections: not a multiple of 64
    kept = dict(report.skipped)
    assert any("group size 64" in r for r in kept.values())
    assert all(m2.get_submodule(n).in_features % 64 == 0 for n in quantized_layers(m2))


def test_skip_reason_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="fewstep.quant"):
        fs.quantize(tiny_dit(), "int4-emulated", group_size=64)
    assert "not a multiple of the INT4 group size 64" in caplog.text
    assert "adaLN modulation" in caplog.text


@pytest.mark.parametrize("mode,floor", [("int4-emulated", 15.0), ("w4a8-emulated", 14.0)])
def test_dit_forward_close_to_unquantized(mode, floor):
    ref_m, q = tiny_dit(), tiny_dit()
    x, t, y = _dit_inputs()
    fs.quantize(q, mode, group_size=32)
    with torch.no_grad():
        assert sqnr_db(_dit_out(q, x, t, y), _dit_out(ref_m, x, t, y)) >= floor


def test_triton_kernels_match_emulation(monkeypatch):
    if DEV == "cuda" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("quant='int4' needs bf16 tensor cores (compute capability 8.0+)")
    a, b = tiny_dit(), tiny_dit()
    x, t, y = _dit_inputs()
    fs.quantize(a, "int4", group_size=32)
    fs.quantize(b, "int4-emulated", group_size=32)
    with torch.no_grad():
        out, emulated = _dit_out(a, x, t, y), _dit_out(b, x, t, y)
        if DEV == "cpu":
            torch.testing.assert_close(out, emulated, rtol=1e-4, atol=1e-4)
            return
        # a GPU runs the fp32 GEMMs as TF32: the emulation with both operands of every INT4 GEMM truncated to
        # TF32 (tests/kernels/int4_util.py) is the model the floor comes from (67 dB here: floor 61 dB)
        import fewstep.kernels.int4_gemm as I
        import fewstep.quant.int4_linear as L

        deq, ref = I.dequantize_int4_ref, L.int4_gemm_ref
        monkeypatch.setattr(I, "dequantize_int4_ref", lambda *w: tf32(deq(*w)).to(DEV, torch.float32))
        monkeypatch.setattr(L, "int4_gemm_ref", lambda a, *r, **kw: ref(tf32(a).to(DEV, a.dtype), *r, **kw))
        model = _dit_out(b, x, t, y)
    assert sqnr_db(out, emulated) >= floor_db(model, emulated)


def test_unet_1x1_convs():
    m = tiny_unet()
    report = fs.quantize(m, "int4-emulated", group_size=32)
    assert any(type(x).__name__ == "INT4Conv1x1" for x in quantized_layers(m).values()) or report.quantized
    x = torch.randn(1, 4, 8, 8, device=DEV)
    ctx = torch.randn(1, 3, 32, device=DEV)
    with torch.no_grad():
        out = m(x, 10, encoder_hidden_states=ctx, return_dict=False)[0]
        ref = tiny_unet()(x, 10, encoder_hidden_states=ctx, return_dict=False)[0]
    assert sqnr_db(out, ref) >= 15.0


def test_bad_modes_and_hardware_are_clear_errors(monkeypatch):
    import fewstep.quant.quantize_model as qmod

    with pytest.raises(ValueError, match="group_size must be one of"):
        fs.quantize(tiny_dit(), "int4-emulated", group_size=48)
    with pytest.raises(ValueError, match="activation_scales"):
        fs.QuantConfig("int4", activation_scales="static")
    with pytest.raises(ValueError, match="int4_method"):
        fs.QuantConfig("int4", int4_method="gptq")
    monkeypatch.setattr(qmod, "interpreting", lambda: False)
    if DEV == "cpu":
        with pytest.raises(RuntimeError, match="w4a8-emulated"):
            fs.quantize(tiny_dit(), "w4a8")
        with pytest.raises(RuntimeError, match="int4-emulated"):
            fs.quantize(tiny_dit(), "int4")
    else:
        monkeypatch.setattr(qmod, "has_fp8_tensor_cores", lambda d: False)
        with pytest.raises(RuntimeError, match="compute capability 8.9"):
            fs.quantize(tiny_dit(), "w4a8")


def _compile(model, **kw):
    fn, spec = fs.models.from_diffusers(model)
    y = torch.tensor([3, 7], device=DEV)
    plan = fs.compile(fn, spec, solver="euler", nfe=3, shape=SHAPE, device=DEV, guidance_scale=2.0,
                      cond={"class_labels": y}, **kw)
    return plan, y


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(DEV)


def test_awq_plan_is_calibrated_on_the_plan_and_closer_than_rtn():
    ref_plan, y = _compile(tiny_dit())
    ref = ref_plan(_noise(5), class_labels=y)
    rtn_model, awq_model = tiny_dit(), tiny_dit()
    rtn, _ = _compile(rtn_model, quant="int4-emulated", quant_options={**OPTS, "int4_method": "rtn"})
    awq, _ = _compile(awq_model, quant="int4-emulated", quant_options={**OPTS, "calibration_inputs": 2})
    report = awq_model._fewstep_quant
    # keyed by the Linear's name: a GELU's projection (ff.net.0.proj) is the layer ff.net.0
    assert report.calibration
    assert all(n in report.quantized or n.rpartition(".")[0] in report.quantized for n in report.calibration)
    assert not rtn_model._fewstep_quant.calibration
    assert all(v["error"] <= v["rtn_error"] for v in report.calibration.values())
    assert any(x.input_scale is not None for x in quantized_layers(awq_model).values())
    # on held-out noise the calibrated plan is no worse than round-to-nearest
    assert sqnr_db(awq(_noise(5), class_labels=y), ref) >= sqnr_db(rtn(_noise(5), class_labels=y), ref) - 0.5


def test_save_load_restores_packed_weights_without_calibrating(tmp_path, monkeypatch):
    model = tiny_dit()
    plan, y = _compile(model, quant="int4-emulated", quant_options={**OPTS, "calibration_inputs": 1,
                                                                    "zero_point": True})
    out = plan(_noise(1), class_labels=y)
    plan.save(tmp_path / "p.plan")
    import fewstep.quant.int4_calibrate as cal

    def no_calibration(*a, **k):
        raise AssertionError("load calibrated")

    monkeypatch.setattr(cal, "awq_search", no_calibration)
    monkeypatch.setattr(cal.InputStats, "__init__", no_calibration)
    fresh = tiny_dit()
    fn, _ = fs.models.from_diffusers(fresh)
    loaded = fs.load(tmp_path / "p.plan", fn, device=DEV)
    assert torch.equal(loaded(_noise(1), class_labels=y), out)
    saved, restored = quantized_layers(model), quantized_layers(fresh)
    assert sorted(saved) == sorted(restored)
    for name, m in saved.items():
        r = restored[name]
        assert torch.equal(r.packed, m.packed) and torch.equal(r.scales, m.scales)
        assert torch.equal(r.zeros, m.zeros)
        assert (r.input_scale is None) == (m.input_scale is None)
        if m.input_scale is not None:
            assert torch.equal(r.input_scale, m.input_scale)
    assert loaded._quant == plan._quant and loaded._quant.zero_point


def test_plan_file_with_a_bad_int4_tensor_is_rejected(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    plan, y = _compile(tiny_dit(), quant="int4-emulated", quant_options={**OPTS, "int4_method": "rtn"})
    path = tmp_path / "q.plan"
    plan.save(path)
    with safe_open(str(path), "pt") as f:
        doc = f.metadata()["fewstep.plan"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if k.endswith("/packed"))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "bad.plan"), metadata={"fewstep.plan": doc})
    fn, _ = fs.models.from_diffusers(tiny_dit())
    with pytest.raises(ValueError, match="packed"):
        fs.load(tmp_path / "bad.plan", fn, device=DEV)
    d = json.loads(doc)
    layer = next(iter(d["quant"]["layers"]))
    d["quant"]["layers"][layer]["buffers"] = ["weight", "scales"]
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "bad2.plan"), metadata={"fewstep.plan": json.dumps(d)})
    with pytest.raises(ValueError, match="buffers"):
        fs.load(tmp_path / "bad2.plan", fn, device=DEV)


def test_quant_config_json_round_trip_and_old_files():
    c = fs.QuantConfig("w4a8", group_size=64, zero_point=True, int4_method="rtn")
    assert fs.QuantConfig.from_json(c.to_json()) == c
    old = fs.QuantConfig("fp8").to_json()
    for k in ("group_size", "zero_point", "int4_method"):
        old.pop(k)
    assert fs.QuantConfig.from_json(old) == fs.QuantConfig("fp8")  # files written before INT4 still read
    assert "group_size" not in fs.QuantConfig("fp8").structure
    assert fs.QuantConfig("int4").structure["group_size"] == 128


def test_engine_quantizes_once_for_every_plan():
    model = tiny_dit()
    fn, spec = fs.models.from_diffusers(model)
    eng = fs.Engine(fn, spec, solver="euler", nfe=2, quant="int4-emulated",
                    quant_options={**OPTS, "int4_method": "rtn"}, guidance_scale=None)
    a = eng(_noise(0), class_labels=torch.tensor([1, 2], device=DEV))
    layers = quantized_layers(model)
    b = eng(torch.randn(1, 4, 8, 8, device=DEV), class_labels=torch.tensor([1], device=DEV))
    assert a.shape == SHAPE and b.shape == (1, 4, 8, 8) and quantized_layers(model) == layers
    w = next(iter(layers.values()))
    assert torch.isfinite(dequantize_int4_ref(w.packed, w.scales, w.zeros)).all()
