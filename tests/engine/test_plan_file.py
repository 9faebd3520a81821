"""Plan files are data: round trip, every way a file can be wrong, and pickles (malicious ones included)."""

import json
import os
import pickle
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fewstep as fs
import fewstep.engine.plan as plan_module
from fewstep.kernels.solver_update import KernelConfig

from ..kernels.programs import VP, guided_toy_net, toy_net
from ..solvers.test_serialize import _assert_same
from .test_plan import DEV, SHAPE, _noise, as_plan_model


def _cond_net(x, t, class_labels):
    y = class_labels.to(x.dtype).view(-1, 1, 1, 1)
    return torch.tanh(x) * (1 + 0.1 * y) * (t.view(-1, 1, 1, 1) / 1000)


@pytest.fixture
def saved(tmp_path):
    """A stochastic, guided, conditioned plan and its file."""
    model = as_plan_model(guided_toy_net)
    plan = fs.compile(model, VP, solver="dpmpp_2m_sde", nfe=3, shape=SHAPE, device=DEV, guidance_scale=2.5,
                      check_finite=True)
    path = tmp_path / "p.plan"
    plan.save(path)
    return plan, model, path


def _read(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["fewstep.plan"]), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path, edit, out=None):
    """Write a copy of the plan file at ``path`` with its document changed by ``edit(doc)``."""
    doc, tensors = _read(path)
    edit(doc)
    out = out or path.with_name("edited.plan")
    save_file(tensors, str(out), metadata={"fewstep.plan": json.dumps(doc)})
    return out


def test_round_trip_is_exact(saved):
    plan, model, path = saved
    again = fs.load(path, model, device=DEV)
    _assert_same(again.program, plan.program)  # the StepProgram, bit for bit
    assert again.shape == plan.shape and again.dtype == plan.dtype and again.config == plan.config
    assert again.check_finite and again.kernel_config == plan.kernel_config
    assert torch.equal(again(_noise(), seed=4), plan(_noise(), seed=4))
    doc, tensors = _read(path)  # readable by any safetensors reader, as plain JSON
    assert doc["format"] == "fewstep.plan" and doc["version"] == 1 and tensors == {}
    assert doc["shape"] == list(SHAPE) and doc["config"]["dtype"] == "float32"
    assert [p.name for p in path.parent.iterdir()] == ["p.plan"]  # no temporary file left behind


def test_conditioning_shapes_and_dtypes_round_trip(tmp_path):
    labels = torch.tensor([1, 2, 3], device=DEV)
    plan = fs.compile(_cond_net, VP, solver="euler", nfe=2, shape=SHAPE, device=DEV,
                      cond={"class_labels": labels})
    plan.save(tmp_path / "c.plan")
    assert _read(tmp_path / "c.plan")[0]["cond"] == {"class_labels": {"shape": [3], "dtype": "int64"}}
    again = fs.load(tmp_path / "c.plan", _cond_net, device=DEV)
    other = torch.tensor([0, 5, 9], device=DEV)
    assert torch.equal(again(_noise(), class_labels=other), plan(_noise(), class_labels=other))
    with pytest.raises(ValueError, match="dtype: expected torch.int64"):
        again(_noise(), class_labels=other.int())


def test_loaded_kernel_config_reaches_the_kernel(tmp_path, monkeypatch):
    model = as_plan_model(toy_net)
    shape = (1, 3, 2, 3)
    kc = KernelConfig(16, 2)  # not what pick_config gives: the kernel must get the recorded one
    plan = fs.compile(model, VP, solver="euler", nfe=2, shape=shape, device=DEV, kernels="triton",
                      kernel_config=kc)
    plan.save(tmp_path / "k.plan")
    assert _read(tmp_path / "k.plan")[0]["config"]["kernel_config"] == {"block": 16, "num_warps": 2}
    seen, real = [], plan_module.solver_update

    def spy(*args, config=None, **kw):
        seen.append(config)
        return real(*args, config=config, **kw)

    monkeypatch.setattr(plan_module, "solver_update", spy)
    again = fs.load(tmp_path / "k.plan", model, device=DEV)
    seen.clear()
    out = again(_noise(shape))
    assert len(seen) == 3 and set(seen) == {kc}  # prologue + 2 steps, every launch with the recorded config
    assert torch.equal(out, plan(_noise(shape)))


@pytest.mark.parametrize("cut", [0, 4, 8, 12, -40, -1])
def test_truncated_file(saved, cut):
    plan, model, path = saved
    data = path.read_bytes()
    bad = path.with_name("cut.plan")
    bad.write_bytes(data[:cut] if cut > 0 else data[:len(data) + cut] if cut else b"")
    with pytest.raises(fs.PlanFileError, match="truncated" if cut else "empty file") as e:
        fs.load(bad, model)
    assert str(bad) in str(e.value) and e.value.path == str(bad)


def test_random_bytes_and_other_files(saved, tmp_path):
    _, model, _ = saved
    rnd = tmp_path / "random.plan"
    rnd.write_bytes(b"\x13" + random.Random(0).randbytes(4095))
    other_json = tmp_path / "other.json"
    other_json.write_text(json.dumps({"format": "something.else", "version": 1}))
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(weights))
    foreign = tmp_path / "foreign.plan"
    save_file({}, str(foreign), metadata={"fewstep.plan": json.dumps({"format": "other", "version": 1})})
    cases = [(rnd, "not a safetensors file"), (other_json, "a JSON document"),
             (weights, "without a fewstep plan document"), (foreign, "document format 'other'"),
             (tmp_path / "missing.plan", "cannot read"), (tmp_path, "cannot read")]
    for path, what in cases:
        with pytest.raises(fs.PlanFileError, match="not a fewstep plan file|cannot read") as e:
            fs.load(path, model)
        assert str(e.value).startswith(f"{path}: ") and what in str(e.value)


def test_unsupported_format_version(saved):
    _, model, path = saved

    def v2(doc):
        doc["version"] = 2

    with pytest.raises(fs.PlanFileError, match=r"format version 2 unsupported \(this fewstep reads 1\)"):
        fs.load(_rewrite(path, v2), model)


@pytest.mark.parametrize("where", ["shape", "program", "config", "cond", "quant", "config.kernels",
                                   "config.kernel_config", "program.stages", "program.spec"])
def test_missing_field_is_named(saved, where):
    _, model, path = saved

    def drop(doc):
        *parents, last = where.split(".")
        d = doc
        for p in parents:
            d = d[p]
        del d[last]

    with pytest.raises(fs.PlanFileError, match=rf"field '{where}' missing"):
        fs.load(_rewrite(path, drop), model)


@pytest.mark.parametrize("edit,what", [
    (lambda d: d.update(shape=[3, 2.5, 5, 7]), r"shape\[1\] must be an int, got float 2.5"),
    (lambda d: d.update(shape="3,2,5,7"), "shape: expected list"),
    (lambda d: d["config"].update(kernels="opencl"), "config: PlanConfig.kernels must be one of"),
    (lambda d: d["config"].update(kernel_config={"block": 1000, "num_warps": 4}), "config.kernel_config"),
    (lambda d: d["config"].update(dtype="int8"), "config.dtype"),
    (lambda d: d["config"].update(dtype="load"), "config.dtype"),
    (lambda d: d["config"].update(record_noise="yes"), "record_noise"),
    (lambda d: d["cond"].update(y={"shape": [3], "dtype": "object"}), "cond.y"),
    (lambda d: d["program"]["stages"][1].update(matrix=[[1.0]]), r"program.stages\[1\].matrix"),
    (lambda d: d.update(quant={"config": {}, "layers": {}}), "quant.config"),
])
def test_invalid_field_is_named(saved, edit, what):
    _, model, path = saved
    with pytest.raises(fs.PlanFileError, match=what) as e:
        fs.load(_rewrite(path, edit), model)
    assert str(e.value).startswith(str(path.with_name("edited.plan")))


def test_tensors_the_document_does_not_describe(saved):
    _, model, path = saved
    doc, _ = _read(path)
    odd = path.with_name("odd.plan")
    save_file({"extra": torch.ones(3)}, str(odd), metadata={"fewstep.plan": json.dumps(doc)})
    with pytest.raises(fs.PlanFileError, match="not described by the plan document"):
        fs.load(odd, model)


class _Payload:
    """Unpickling this creates the directory ``marker``: what a hostile plan file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(saved, tmp_path, writer):
    _, model, _ = saved
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    data = {"format": "fewstep.plan/1", "program": _Payload(marker)}  # the old plan format, armed
    if writer == "torch.save":
        torch.save(data, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=2)
    with pytest.raises(fs.PlanFileError, match=r"a pickle \(torch.save\) file, refused"):
        fs.load(path, model)
    assert not marker.exists()
    # the file is armed: unpickling it (what fs.load used to do) runs the payload
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_old_torch_save_plan_is_refused(saved, tmp_path):
    plan, model, _ = saved
    old = tmp_path / "old.pt"
    torch.save({"format": "fewstep.plan/1", "shape": plan.shape, "dtype": "torch.float32"}, old)
    with pytest.raises(fs.PlanFileError, match="fewstep no longer reads pickled plans"):
        fs.load(old, model)


def test_saving_does_not_leave_a_half_written_file(tmp_path, monkeypatch):
    import safetensors.torch

    plan = fs.compile(as_plan_model(toy_net), VP, solver="euler", nfe=2, shape=SHAPE, device=DEV)
    path = tmp_path / "p.plan"
    plan.save(path)
    before = path.read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        plan.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.plan"]
