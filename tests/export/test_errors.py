"""Bad input: networks that cannot be one static graph, bad opsets, files that are not (or no longer) the
plan they claim, calls with wrong inputs.  Every error names what was expected and what came; a failed export
leaves nothing behind and the network as it was."""

import json

import pytest
import torch

import fewstep as fs
from fewstep.export import ExportError, OnnxLoadError, export_network

from .conftest import DIGITS_SHAPE, LABELS, digits_plan, randn

SPEC = fs.ModelSpec(fs.schedules.DiscreteVP(), prediction="epsilon")


class Branchy(torch.nn.Module):
    """A tiny denoiser whose forward branches on the value of its input (not traceable as one graph)."""

    def __init__(self, branch_on: str = "value"):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.branch_on = branch_on

    def forward(self, x, t):
        h = self.lin(x.transpose(1, -1)).transpose(1, -1)
        if self.branch_on == "value":
            if h.mean() > 0:  # data-dependent: which branch depends on the noise
                return h * 2
            return h
        if self.branch_on == "number":
            return h * int(x.abs().max() * 10)  # a value read off the input and frozen by a trace
        if x.shape[0] == 2:  # shape-dependent: static in a plan, fine
            return h * 2
        return h


def _plan(model, shape=(2, 4, 2, 2)):
    return fs.compile(model, SPEC, solver="ddim", nfe=2, shape=shape, device="cpu", cuda_graph=False)


def test_data_dependent_control_flow_names_the_line_and_the_op(tmp_path):
    plan = _plan(Branchy("value"))
    with pytest.raises(ExportError) as e:
        plan.export_onnx(tmp_path / "p.onnx")
    msg = str(e.value)
    assert "test_errors.py" in msg and "h.mean() > 0" in msg, msg  # the line
    assert "aten::gt" in msg and "'x'" in msg, msg  # the op and the input it depends on
    assert "data-dependent control flow" in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_value_read_off_the_input_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"reads as a Python int.*aten::mul"):
        _plan(Branchy("number")).export_onnx(tmp_path / "p.onnx")


def test_shape_dependent_branches_export(tmp_path):
    """Branches on shapes are static in a plan: no error, and the file computes what the plan does."""
    plan = _plan(Branchy("shape"))
    plan.export_onnx(tmp_path / "p.onnx")
    noise = randn(2, 4, 2, 2, seed=0)
    ref = plan(noise)
    out = fs.load_onnx(tmp_path / "p.onnx")(noise)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("opset", [16, 22, "19", True])
def test_opset_out_of_range(digits, opset, tmp_path):
    plan, _ = digits_plan(digits, "ddim", nfe=1, guidance=None)
    with pytest.raises(ValueError, match="opset"):
        plan.export_onnx(tmp_path / "p.onnx", opset=opset)


def test_missing_directory(digits, tmp_path):
    plan, _ = digits_plan(digits, "ddim", nfe=1, guidance=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan.export_onnx(tmp_path / "nope" / "p.onnx")


@pytest.fixture(scope="module")
def digits_file(digits, tmp_path_factory):
    plan, cond = digits_plan(digits, "euler", nfe=2, guidance=1.5)
    path = tmp_path_factory.mktemp("file") / "plan.onnx"
    plan.export_onnx(path)
    return path, cond


def test_call_errors_name_expected_and_got(digits_file):
    path, cond = digits_file
    p = fs.load_onnx(path)
    noise = randn(*DIGITS_SHAPE, seed=1)
    with pytest.raises(ValueError, match=r"noise shape: expected \(2, 1, 8, 8\), got \(3, 1, 8, 8\)"):
        p(randn(3, 1, 8, 8, seed=1), **cond)
    with pytest.raises(ValueError, match=r"missing \['class_labels'\]"):
        p(noise)
    with pytest.raises(ValueError, match=r"unexpected \['encoder_hidden_states'\]"):
        p(noise, encoder_hidden_states=torch.zeros(2, 3), **cond)
    with pytest.raises(ValueError, match=r"class_labels.*dtype: expected torch.int64, got torch.int32"):
        p(noise, class_labels=LABELS.int())
    with pytest.raises(ValueError, match=r"class_labels.*shape: expected \(2,\), got \(3,\)"):
        p(noise, class_labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="deterministic and takes no stage noise"):
        p(noise, stage_noise=torch.zeros(1, *DIGITS_SHAPE), **cond)
    with pytest.raises(ValueError, match="noise dtype: expected torch.float32, got torch.float64"):
        p(noise.double(), **cond)


def test_load_for_another_shape(digits_file):
    path, _ = digits_file
    with pytest.raises(OnnxLoadError, match=r"for noise shape \(2, 1, 8, 8\), expected \(4, 1, 8, 8\)"):
        fs.load_onnx(path, shape=(4, 1, 8, 8))
    assert fs.load_onnx(path, shape=DIGITS_SHAPE).shape == DIGITS_SHAPE


def test_load_a_file_that_is_not_a_plan(digits, tmp_path):
    """The network alone (no fewstep metadata), garbage bytes, a missing file."""
    model, _ = digits
    export_network(model, tmp_path / "net.onnx", x=randn(2, 1, 8, 8, seed=0), t=torch.full((2,), 10.0),
                   cond={"class_labels": LABELS})
    with pytest.raises(OnnxLoadError, match="not a plan exported by fewstep"):
        fs.load_onnx(tmp_path / "net.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07not a protobuf" * 10)
    with pytest.raises(OnnxLoadError, match="onnxruntime cannot load it"):
        fs.load_onnx(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError):
        fs.load_onnx(tmp_path / "missing.onnx")


def _edit(path, out, edit):
    import onnx

    m = onnx.load(str(path))
    edit(m)
    onnx.save(m, str(out))
    return out


def test_load_a_file_whose_graph_and_metadata_disagree(digits_file, tmp_path):
    """An input renamed in the graph, or metadata promising another shape: refused at load, naming it."""
    path, _ = digits_file

    def rename_input(m):
        for n in m.graph.node:
            n.input[:] = ["labels" if i == "class_labels" else i for i in n.input]
        m.graph.input[1].name = "labels"

    with pytest.raises(OnnxLoadError, match=r"missing \['class_labels'\], unexpected \['labels'\]"):
        fs.load_onnx(_edit(path, tmp_path / "a.onnx", rename_input))

    def other_shape(m):
        doc = json.loads(m.metadata_props[0].value)
        doc["inputs"]["noise"]["shape"] = [4, 1, 8, 8]
        m.metadata_props[0].value = json.dumps(doc)

    with pytest.raises(OnnxLoadError, match=r"input 'noise': the graph has shape \(2, 1, 8, 8\), the meta"):
        fs.load_onnx(_edit(path, tmp_path / "b.onnx", other_shape))

    def other_version(m):
        doc = json.loads(m.metadata_props[0].value)
        doc["version"] = 99
        m.metadata_props[0].value = json.dumps(doc)

    with pytest.raises(OnnxLoadError, match="version 99 unsupported"):
        fs.load_onnx(_edit(path, tmp_path / "c.onnx", other_version))


def test_failed_export_restores_fp8_layers(tmp_path):
    """An export that fails while FP8 layers are swapped for their Q/DQ views puts the originals back."""
    from fewstep.quant import FP8Linear

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x, t):
            h = self.lin(x.transpose(1, -1)).transpose(1, -1)
            return h * 2 if h.sum() > 0 else h

    model = Net()
    plan = fs.compile(model, SPEC, solver="ddim", nfe=1, shape=(1, 16, 2, 2), device="cpu", cuda_graph=False,
                      quant="fp8-emulated")
    layer = model.lin
    assert isinstance(layer, FP8Linear)
    with pytest.raises(ExportError, match="h.sum"):
        plan.export_onnx(tmp_path / "p.onnx")
    assert model.lin is layer
    assert list(tmp_path.iterdir()) == []


def test_an_op_without_onnx_conversion_is_named(tmp_path):
    class Special(torch.nn.Module):
        def forward(self, x, t):
            return torch.special.zeta(x.abs() + 2.0, torch.full_like(x, 1.5))

    with pytest.raises(ExportError, match=r"could not convert the network.*aten::special_zeta"):
        _plan(Special()).export_onnx(tmp_path / "p.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_traced_network_for_another_plan_is_refused(digits, tmp_path):
    from fewstep.export import export_plan, trace_network

    model, _ = digits
    traced = trace_network(model, x=randn(2, 1, 8, 8, seed=0), t=torch.full((2,), 10.0),
                           cond={"class_labels": LABELS})  # batch 2: a plan of batch 2 without guidance
    plan, cond = digits_plan(digits, "ddim", nfe=1, guidance=1.5)  # guidance: the network sees batch 4
    with pytest.raises(ValueError, match=r"traced for x \(\(2, 1, 8, 8\).*needs x \(\(4, 1, 8, 8\)"):
        export_plan(model, plan.program, tmp_path / "p.onnx", shape=plan.shape, dtype=plan.dtype,
                    device=plan.device, cond=cond, network=traced)
    assert list(tmp_path.iterdir()) == []
