"""The TensorRT path, without TensorRT (it cannot be installed here): the builder's calls are checked against
a stand-in ``tensorrt`` module that records them, and a missing TensorRT is a one-line error.  Nothing here
runs a real TensorRT build; that path is unverified until it runs on a machine with TensorRT."""

import json
import sys
import types

import pytest
import torch

import fewstep as fs
from fewstep.export import build_engine, load_trt

from .conftest import digits_plan


class _Enum:
    def __init__(self, **values):
        self.__dict__.update(values)


def fake_tensorrt(calls: list, *, parse_ok=True, build_ok=True, engine=None):
    """A module with the TensorRT 10 names build_engine / load_trt use; each call is appended to ``calls``."""
    trt = types.ModuleType("tensorrt")
    trt.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=5)
    trt.MemoryPoolType = _Enum(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = _Enum(FP16="FP16", BF16="BF16")
    trt.TensorIOMode = _Enum(INPUT="INPUT", OUTPUT="OUTPUT")

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level):
            calls.append(("Logger", level))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return "network"

        def create_builder_config(self):
            calls.append(("create_builder_config",))
            return Config()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network", network))
            return b"ENGINE-BYTES" if build_ok else None

    class OnnxParser:
        num_errors = 0 if parse_ok else 2

        def __init__(self, network, logger):
            calls.append(("OnnxParser", network))

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return parse_ok

        def get_error(self, i):
            return f"error {i}: unsupported node"

    class Runtime:
        def __init__(self, logger):
            calls.append(("Runtime",))

        def deserialize_cuda_engine(self, data):
            calls.append(("deserialize_cuda_engine", data))
            return engine

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt


@pytest.fixture(scope="module")
def onnx_file(digits, tmp_path_factory):
    plan, _ = digits_plan(digits, "unipc", nfe=2)
    path = tmp_path_factory.mktemp("trt") / "plan.onnx"
    plan.export_onnx(path)
    return path


def _with_dtype(path, tmp_path, dtype=None, quant=None):
    """A copy of the file whose metadata says another plan dtype / quantization (what the builder reads)."""
    import onnx

    m = onnx.load(str(path))
    doc = json.loads(m.metadata_props[0].value)
    doc.update({k: v for k, v in (("dtype", dtype), ("quant", quant)) if v is not None})
    m.metadata_props[0].value = json.dumps(doc)
    out = tmp_path / f"plan-{dtype}-{quant}.onnx"
    onnx.save(m, str(out))
    return out


@pytest.mark.parametrize("dtype,quant,flags,created", [
    ("float32", None, [], 0),
    ("float16", None, [("set_flag", "FP16")], 0),
    ("bfloat16", None, [("set_flag", "BF16")], 0),
    ("float32", "fp8-emulated", [], 1 << 5),  # strongly typed, no precision flags
])
def test_build_engine_call_sequence(onnx_file, tmp_path, monkeypatch, dtype, quant, flags, created):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    src = _with_dtype(onnx_file, tmp_path, dtype, quant)
    out = build_engine(src, tmp_path / "plan.engine", workspace_bytes=1 << 20)
    assert out.read_bytes() == b"ENGINE-BYTES"
    assert calls == [("Logger", "WARNING"), ("Builder",), ("create_network", created),
                     ("OnnxParser", "network"), ("parse_from_file", str(src)), ("create_builder_config",),
                     ("set_memory_pool_limit", "WORKSPACE", 1 << 20), *flags,
                     ("build_serialized_network", "network")]


def test_parser_and_build_failures_write_nothing(onnx_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([], parse_ok=False))
    with pytest.raises(RuntimeError, match="parser rejected.*error 0: unsupported node; error 1"):
        build_engine(onnx_file, tmp_path / "a.engine")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([], build_ok=False))
    with pytest.raises(RuntimeError, match="could not build an engine"):
        build_engine(onnx_file, tmp_path / "b.engine")
    assert list(tmp_path.iterdir()) == []


def test_without_tensorrt_one_line_error(onnx_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    for call in (lambda: build_engine(onnx_file, tmp_path / "x.engine"), lambda: load_trt(tmp_path / "x")):
        with pytest.raises(ImportError) as e:
            call()
        assert "TensorRT is not installed" in str(e.value) and "\n" not in str(e.value)
    assert fs.load_trt is load_trt


class _Dtype:
    def __init__(self, name):
        self.name = name


class FakeEngine:
    """I/O tensors of an engine built from the digits file (noise, class_labels -> sample)."""

    io = [("noise", (2, 1, 8, 8), "FLOAT", "INPUT"), ("class_labels", (2,), "INT64", "INPUT"),
          ("sample", (2, 1, 8, 8), "FLOAT", "OUTPUT")]
    num_io_tensors = 3

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _row(self, name):
        return next(r for r in self.io if r[0] == name)

    def get_tensor_shape(self, name):
        return self._row(name)[1]

    def get_tensor_dtype(self, name):
        return _Dtype(self._row(name)[2])

    def get_tensor_mode(self, name):
        return self._row(name)[3]

    def create_execution_context(self):
        return object()


def test_load_trt_reads_the_engine_io_and_checks_inputs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls, engine=FakeEngine()))
    (tmp_path / "plan.engine").write_bytes(b"ENGINE-BYTES")
    plan = load_trt(tmp_path / "plan.engine", device="cpu")
    assert ("deserialize_cuda_engine", b"ENGINE-BYTES") in calls
    assert plan.shape == (2, 1, 8, 8) and plan.cond == {"class_labels": ((2,), torch.int64)}
    assert plan.noisy_stages == 0
    with pytest.raises(ValueError, match=r"missing \['class_labels'\]"):
        plan(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"noise: expected shape \(2, 1, 8, 8\), got \(1, 1, 8, 8\)"):
        plan(torch.zeros(1, 1, 8, 8), class_labels=torch.tensor([1, 2]))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([], engine=None))
    with pytest.raises(ValueError, match="cannot deserialize"):
        load_trt(tmp_path / "plan.engine", device="cpu")
