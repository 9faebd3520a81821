"""StepPrograms round-trip through JSON bit for bit; a malformed document names the field that is wrong."""

import copy
import json

import numpy as np
import pytest

import fewstep as fs
from fewstep.solvers import Spacing, program_from_dict, program_to_dict

SPECS = {
    "vp": fs.ModelSpec(fs.schedules.DiscreteVP(beta_schedule="scaled_linear")),
    "vp-v": fs.ModelSpec(fs.schedules.DiscreteVP(rescale_zero_terminal_snr=True), prediction="v_prediction"),
    "flow": fs.ModelSpec(fs.schedules.Flow(shift=3.0), prediction="flow"),
    "edm": fs.ModelSpec(fs.schedules.EDM(), prediction="sample", time_input="sigma"),
}


def _programs():
    for spec_name, spec in SPECS.items():
        for solver in fs.solvers.available():
            for guidance in (None, 3.5):
                try:
                    yield f"{spec_name}-{solver}-{guidance}", fs.solvers.build(solver, spec, 5,
                                                                              guidance_scale=guidance)
                except ValueError:  # the solver does not run on this schedule
                    continue


def _round_trip(prog):
    return program_from_dict(json.loads(json.dumps(program_to_dict(prog))))


def _assert_same(a, b):
    assert (a.solver, a.spec, a.registers) == (b.solver, b.spec, b.registers)
    assert a.guidance_scale == b.guidance_scale
    assert dict(a.options) == dict(b.options)
    assert len(a.stages) == len(b.stages)
    for sa, sb in zip(a.stages, b.stages):
        assert (sa.call, sa.inputs, sa.outputs, sa.noise, dict(sa.info)) == (
            sb.call, sb.inputs, sb.outputs, sb.noise, dict(sb.info))
        assert sa.matrix.dtype == sb.matrix.dtype == np.float64
        assert np.array_equal(sa.matrix, sb.matrix)  # bit for bit, not approximately


def test_every_solver_round_trips_exactly():
    progs = list(_programs())
    assert len(progs) > 40
    for _, prog in progs:
        _assert_same(prog, _round_trip(prog))


def test_options_and_diffusers_config_survive():
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "prediction_type": "epsilon", "timestep_spacing": "trailing"}
    spec = fs.ModelSpec.from_diffusers_scheduler_config(cfg)
    prog = fs.solvers.build("euler", spec, 4, spacing=Spacing("ays", ays="sdxl"))
    back = _round_trip(prog)
    _assert_same(prog, back)
    spacing = Spacing("karras", rho=5.0)
    with_spacing = type(prog)(prog.solver, prog.spec, prog.stages, prog.registers, None, {"spacing": spacing})
    assert _round_trip(with_spacing).options["spacing"] == spacing
    assert dict(back.spec.diffusers_config) == dict(spec.diffusers_config)


def test_a_loaded_program_runs_like_the_original():
    prog = fs.solvers.build("unipc", SPECS["vp"], 6, guidance_scale=2.0)
    import torch

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)

    def model(x, t):
        return 0.3 * x + 0.05 * x**2  # non-linear: every coefficient matters

    a = fs.solvers.run_reference(prog, model, noise)
    b = fs.solvers.run_reference(_round_trip(prog), model, noise)
    assert torch.equal(a, b)


def _doc():
    return program_to_dict(fs.solvers.build("dpmpp_2m", SPECS["vp"], 4))


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.pop("stages"), r"program\.stages: field missing"),
    (lambda d: d.update(solver=3), r"program\.solver: expected str, got int"),
    (lambda d: d["stages"][1].pop("matrix"), r"program\.stages\[1\]\.matrix: field missing"),
    (lambda d: d["stages"][1].update(matrix=[[1.0]]), r"program\.stages\[1\]\.matrix: expected \d+ x \d+"),
    (lambda d: d["stages"][1].update(matrix=[["a"]]), r"program\.stages\[1\]\.matrix: expected a list"),
    (lambda d: d["stages"][1]["inputs"].append("h9"), r"program\.stages\[1\]: unknown register"),
    (lambda d: d["stages"][1]["call"].pop("time"), r"program\.stages\[1\]\.call\.time: field missing"),
    (lambda d: d["spec"]["schedule"].update(type="Evil"), r"program\.spec\.schedule\.type: expected one of"),
    (lambda d: d["spec"]["schedule"].update(nope=1), r"program\.spec\.schedule: unknown field"),
    (lambda d: d["spec"].update(prediction="bogus"), r"program\.spec: invalid model spec"),
    (lambda d: d["options"].update(spacing={"__type__": "os.system"}),
     r"program\.options\.spacing: unknown type"),
    (lambda d: d.update(guidance_scale=float("nan")), r"program\.guidance_scale: expected a finite number"),
    (lambda d: d.update(stages=d["stages"][1:]), r"expected a prologue stage"),
    (lambda d: d["stages"].__setitem__(0, "x"), r"program\.stages\[0\]: expected an object"),
])
def test_malformed_documents_name_the_field(mutate, match):
    d = copy.deepcopy(_doc())
    mutate(d)
    with pytest.raises(ValueError, match=match):
        program_from_dict(d)


def test_unstorable_option_is_refused():
    prog = fs.solvers.build("euler", SPECS["vp"], 4)
    bad = type(prog)(prog.solver, prog.spec, prog.stages, prog.registers, prog.guidance_scale,
                     {"callback": print})
    with pytest.raises(ValueError, match=r"options\.callback: cannot store a builtin_function_or_method"):
        program_to_dict(bad)
