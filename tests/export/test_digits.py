"""The whole digits sampler as one ONNX file: onnxruntime equals the torch plan (every deterministic solver,
guidance on and off), stochastic solvers through their stage-noise input, weights stored once, a file that
plain onnxruntime loads without fewstep, the checker and strict shape inference."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fewstep as fs
from fewstep.export import STAGE_NOISE, export_network, export_plan, trace_network

from .conftest import DIGITS_SHAPE, LABELS, digits_plan, randn, rel_err

TOL = 1e-4  # relative L2: the same fp32 computation with other op orders and GEMM kernels


def _digits_solvers(stochastic: bool):
    spec = fs.models.digits_spec()
    out = []
    for name in fs.solvers.available():
        try:
            prog = fs.solvers.build(name, spec, 3)
        except ValueError:  # flow solvers need a flow schedule; the digits model is epsilon / DiscreteVP
            continue
        if prog.stochastic == stochastic:
            out.append(name)
    return out


@pytest.fixture(scope="module")
def traced(digits):
    """The digits network traced once per guidance setting: the sweep below differs only in the program."""
    cache = {}

    def get(guidance):
        if guidance not in cache:
            n = DIGITS_SHAPE[0] * (2 if guidance else 1)
            cache[guidance] = trace_network(digits[0], x=randn(n, *DIGITS_SHAPE[1:], seed=9),
                                            t=torch.full((n,), 999.0), cond={"class_labels": LABELS})
        return cache[guidance]

    return get


@pytest.mark.parametrize("guidance", [None, 1.5], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("solver", _digits_solvers(stochastic=False))
def test_every_deterministic_solver_matches_the_plan(digits, traced, solver, guidance, tmp_path):
    plan, cond = digits_plan(digits, solver, guidance=guidance)
    report = export_plan(digits[0], plan.program, tmp_path / "plan.onnx", shape=plan.shape, dtype=plan.dtype,
                         device=plan.device, cond=cond, network=traced(guidance))
    assert report.inputs == {"noise": (DIGITS_SHAPE, "float32"), "class_labels": ((2,), "int64")}
    ort_plan = fs.load_onnx(tmp_path / "plan.onnx")
    noise = randn(*DIGITS_SHAPE, seed=0)
    ref = plan(noise, **cond)
    assert rel_err(ort_plan(noise, **cond), ref) <= TOL
    # the labels are an input, not a constant of the trace: other labels give the plan's other sample
    other = {"class_labels": torch.tensor([0, 9])}
    assert rel_err(ort_plan(noise, **other), plan(noise, **other)) <= TOL
    assert rel_err(plan(noise, **other), ref) > 1e-2


@pytest.mark.parametrize("solver", _digits_solvers(stochastic=True)[:2])
def test_stochastic_solver_takes_its_noise_as_an_input(digits, solver, tmp_path):
    plan, cond = digits_plan(digits, solver, record_noise=True)
    plan.export_onnx(tmp_path / "plan.onnx")
    ort_plan = fs.load_onnx(tmp_path / "plan.onnx")
    assert ort_plan.stochastic and STAGE_NOISE in ort_plan.inputs
    noise = randn(*DIGITS_SHAPE, seed=2)
    ref = plan(noise, seed=5, **cond)
    stage_noise = torch.stack(plan.recorded_noise())
    assert ort_plan.inputs[STAGE_NOISE][0] == tuple(stage_noise.shape)
    assert rel_err(ort_plan(noise, stage_noise=stage_noise, **cond), ref) <= TOL
    # the noise really enters: other stage noise, another sample
    assert rel_err(ort_plan(noise, stage_noise=torch.zeros_like(stage_noise), **cond), ref) > 1e-3


def test_seeded_stage_noise_is_the_reference_stream(digits, tmp_path):
    """seed=s draws what a plan on the PyTorch reference kernels draws for seed s (ref_noise)."""
    solver = _digits_solvers(stochastic=True)[0]
    plan, cond = digits_plan(digits, solver, kernels="torch")
    plan.export_onnx(tmp_path / "plan.onnx")
    ort_plan = fs.load_onnx(tmp_path / "plan.onnx")
    noise = randn(*DIGITS_SHAPE, seed=3)
    assert rel_err(ort_plan(noise, seed=11, **cond), plan(noise, seed=11, **cond)) <= TOL
    assert rel_err(ort_plan(noise, seed=12, **cond), plan(noise, seed=11, **cond)) > 1e-3
    with pytest.raises(ValueError, match="either stage_noise or seed"):
        ort_plan(noise, seed=1, stage_noise=torch.zeros(ort_plan.inputs[STAGE_NOISE][0]), **cond)


def test_weights_are_stored_once(digits, tmp_path):
    """NFE 8 with guidance: the file is at most 1.1x the network alone exported the same way."""
    model, _ = digits
    plan, cond = digits_plan(digits, "unipc", nfe=8, shape=(10, 1, 8, 8))
    report = plan.export_onnx(tmp_path / "plan.onnx")
    alone = export_network(model, tmp_path / "net.onnx", x=randn(20, 1, 8, 8, seed=0),
                           t=torch.full((20,), 500.0), cond=cond)
    assert report.file_bytes <= 1.1 * alone, (report.file_bytes, alone)
    assert report.size_ratio <= 1.1  # and against the parameters' own bytes
    import onnx

    m = onnx.load(str(tmp_path / "plan.onnx"))
    names = [i.name for i in m.graph.initializer]
    assert len(names) == len(set(names))
    stored = sum(onnx.numpy_helper.to_array(i).nbytes for i in m.graph.initializer)
    assert stored <= 1.05 * report.network_bytes  # 8 calls, yet about one network's worth of tensors


def test_plan_export_checker_and_strict_shape_inference(digits, tmp_path):
    import onnx

    plan, _ = digits_plan(digits, "dpmpp_2m", nfe=4)
    plan.export_onnx(tmp_path / "plan.onnx")
    m = onnx.load(str(tmp_path / "plan.onnx"))
    onnx.checker.check_model(m, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    out = inferred.graph.output[0].type.tensor_type
    assert [d.dim_value for d in out.shape.dim] == list(DIGITS_SHAPE)
    meta = json.loads({p.key: p.value for p in m.metadata_props}["fewstep.plan"])
    assert meta["solver"] == "dpmpp_2m" and meta["nfe"] == 4 and meta["shape"] == list(DIGITS_SHAPE)
    assert not any(n.op_type in ("RandomNormal", "RandomNormalLike", "RandomUniform", "Loop", "If")
                   for n in m.graph.node)


def test_plain_onnxruntime_without_fewstep(digits, tmp_path):
    """The file runs in a plain InferenceSession in a process that never imports fewstep."""
    plan, cond = digits_plan(digits, "unipc", nfe=4)
    plan.export_onnx(tmp_path / "plan.onnx")
    noise = randn(*DIGITS_SHAPE, seed=4)
    np.save(tmp_path / "noise.npy", noise.numpy())
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import onnxruntime as ort
        s = ort.InferenceSession({str(tmp_path / 'plan.onnx')!r}, providers=["CPUExecutionProvider"])
        out = s.run(["sample"], {{"noise": np.load({str(tmp_path / 'noise.npy')!r}),
                                  "class_labels": np.array({LABELS.tolist()}, dtype=np.int64)}})[0]
        np.save({str(tmp_path / 'out.npy')!r}, out)
        assert not any(m == "fewstep" or m.startswith("fewstep.") for m in sys.modules), "fewstep imported"
        assert "torch" not in sys.modules, "torch imported"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=tmp_path)
    out = torch.from_numpy(np.load(tmp_path / "out.npy"))
    assert rel_err(out, plan(noise, **cond)) <= TOL


def test_export_leaves_the_network_as_it_was(digits, tmp_path):
    """Export traces in eval mode and puts every module's mode back (the tracer sets them from its root)."""
    model, _ = digits
    plan, cond = digits_plan(digits, "ipndm")
    noise = randn(*DIGITS_SHAPE, seed=6)
    before = plan(noise, **cond)
    plan.export_onnx(tmp_path / "plan.onnx")
    assert not any(m.training for m in model.model.modules())
    assert torch.equal(plan(noise, **cond), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.onnx"]  # no temporary files left
