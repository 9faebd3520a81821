"""`fewstep export` and `fewstep sample --backend onnxruntime FILE`: the bundled model and a local diffusers
directory end to end, and errors: one line on stderr, a non-zero exit, raised before any model is loaded."""

import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import fewstep as fs
from fewstep import cli
from tests.cli.test_cli import _fails, _tiny_unet_dir

from .conftest import randn, rel_err


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "digits.onnx"
    assert cli.main(["export", "--solver", "unipc", "--nfe", "3", "--guidance", "2", "--batch", "3",
                     "--out", str(path), "--verify"]) == 0
    return path


def test_export_bundled_model_and_verify(digits_file, capsys):
    p = fs.load_onnx(digits_file)
    assert p.shape == (3, 1, 8, 8) and p.info["solver"] == "unipc" and p.info["guidance_scale"] == 2.0
    assert p.cond == {"class_labels": ((3,), torch.int64)}


def test_export_prints_the_verification(tmp_path, capsys):
    out = tmp_path / "d.onnx"
    assert cli.main(["export", "--solver", "ddim", "--nfe", "2", "--guidance", "0", "--batch", "1",
                     "--out", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "inputs: noise (1, 1, 8, 8) float32, class_labels (1,) int64" in text
    diff = float(re.search(r"relative difference ([0-9.e+-]+)", text)[1])
    assert diff <= 1e-4


def test_export_int4_emulated(tmp_path, capsys):
    """--quant int4-emulated: INT4 initializers in blocked DequantizeLinear at opset 21 (its default), the
    file within 2e-5 of the plan (test_int4.py measured 1e-6 .. 2e-6 on the whole sample)."""
    import onnx

    out = tmp_path / "int4.onnx"
    assert cli.main(["export", "--quant", "int4-emulated", "--int4-method", "rtn", "--solver", "ddim",
                     "--nfe", "2", "--guidance", "2", "--batch", "2", "--out", str(out), "--verify"]) == 0
    diff = float(re.search(r"relative difference ([0-9.e+-]+)", capsys.readouterr().out)[1])
    assert diff <= 2e-5
    m = onnx.load(str(out))
    assert {o.domain: o.version for o in m.opset_import} == {"": 21}
    assert sum(i.data_type == onnx.TensorProto.INT4 for i in m.graph.initializer) == 16
    assert fs.load_onnx(out).info["quant"] == "int4-emulated"


def test_sample_with_the_onnxruntime_backend(digits_file, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "d.png"
    assert cli.main(["sample", "--backend", "onnxruntime", str(digits_file), "--labels", "1,2,3",
                     "--seed", "4", "--out", str(out)]) == 0, capsys.readouterr().err
    import numpy as np

    from fewstep.cli.images import image_grid

    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    x = fs.load_onnx(digits_file)(noise, class_labels=torch.tensor([1, 2, 3]))
    want = image_grid(x.clamp(-1, 1)[:, 0].numpy(), rows=1, scale=4)
    assert np.array_equal(np.asarray(Image.open(out)), want)  # the file's samples for that seed and labels
    assert "on onnxruntime" in capsys.readouterr().out
    _fails(["sample", "--backend", "onnxruntime", str(digits_file), "--labels", "1,2", "--out", str(out)],
           capsys, "exported for batch 3, got 2 labels")
    _fails(["sample", "--backend", "onnxruntime", str(digits_file), "--nfe", "4", "--batch", "2",
            "--out", str(out)], capsys, "--batch do not apply")
    _fails(["sample", "--backend", "tensorrt", str(digits_file), "--out", str(out)], capsys,
           "expected `torch` or `onnxruntime FILE`")
    _fails(["sample", "--backend", "onnxruntime", str(tmp_path / "none.onnx"), "--out", str(out)], capsys,
           "no such file")


def test_export_and_sample_a_local_unet(tmp_path, capsys):
    unet, sched = _tiny_unet_dir(tmp_path)
    cond = tmp_path / "cond.safetensors"
    save_file({"encoder_hidden_states": randn(1, 5, 24, seed=0),
               "negative_encoder_hidden_states": torch.zeros(1, 5, 24)}, str(cond))
    out = tmp_path / "unet.onnx"
    assert cli.main(["export", "--diffusers", str(unet), "--scheduler-config", str(sched),
                     "--cond", str(cond), "--solver", "dpmpp_2m", "--nfe", "2", "--guidance", "5",
                     "--batch", "2", "--out", str(out), "--verify"]) == 0, capsys.readouterr().err
    diff = float(re.search(r"relative difference ([0-9.e+-]+)", capsys.readouterr().out)[1])
    assert diff <= 1e-4
    p = fs.load_onnx(out)
    assert set(p.cond) == {"encoder_hidden_states", "negative_encoder_hidden_states"}
    png = tmp_path / "lat.png"
    assert cli.main(["sample", "--backend", "onnxruntime", str(out), "--cond", str(cond), "--seed", "1",
                     "--out", str(png)]) == 0, capsys.readouterr().err
    lat = load_file(png.with_suffix(".safetensors"))["latents"]
    full = {k: v.expand(2, *v.shape[1:]) for k, v in load_file(str(cond)).items()}
    want = p(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), **full)
    assert rel_err(lat, want) == 0.0


@pytest.fixture
def no_model_loads(monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("expensive work started before the arguments were checked")

    from fewstep.cli import sample
    from fewstep.models import digits

    monkeypatch.setattr(digits, "load_digits_dit", loaded)
    monkeypatch.setattr(sample, "_load_dir", loaded)


def test_export_errors_before_any_work(tmp_path, capsys, monkeypatch, no_model_loads):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = str(tmp_path / "p.onnx")
    _fails(["export", "--trt", "--out", out], capsys, "TensorRT is not installed")
    _fails(["export", "--out", str(tmp_path / "p.txt")], capsys, "ending in .onnx")
    _fails(["export", "--solver", "nope", "--out", out], capsys, "nope")
    _fails(["export", "--quant", "fp8-emulated", "--opset", "18", "--out", out], capsys, "--opset >= 19")
    _fails(["export", "--opset", "22", "--out", out], capsys, "--opset: expected 17..21")
    _fails(["export", "--quant", "int4-emulated", "--opset", "20", "--out", out], capsys, "--opset >= 21")
    _fails(["export", "--cond", str(tmp_path / "c.npz"), "--out", out], capsys, "only with --diffusers")
    _fails(["export", "--engine", str(tmp_path / "e"), "--out", out], capsys, "applies only with --trt")
    _fails(["export", "--dtype", "int8", "--out", out], capsys, "invalid choice")
    assert list(tmp_path.iterdir()) == []
