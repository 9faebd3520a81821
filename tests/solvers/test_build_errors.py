"""Bad input is rejected when the program is built, with messages naming what was expected."""

import math

import pytest

import fewstep as fs

VP = fs.ModelSpec(fs.schedules.DiscreteVP())
FLOW = fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow")
EDM = fs.ModelSpec(fs.schedules.EDM(), "sample")


def test_unknown_solver_lists_valid_choices():
    with pytest.raises(ValueError, match="valid solvers: .*euler"):
        fs.solvers.build("eulr", VP, 4)


def test_unknown_spacing_lists_valid_choices():
    with pytest.raises(ValueError, match="valid spacings: .*karras"):
        fs.solvers.build("euler", VP, 4, spacing="karas")


@pytest.mark.parametrize("nfe", [0, -3])
def test_nfe_must_be_positive(nfe):
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        fs.solvers.build("euler", VP, nfe)


def test_nfe_must_be_int():
    with pytest.raises(TypeError, match="nfe must be an int"):
        fs.solvers.build("euler", VP, 4.0)


@pytest.mark.parametrize("g", [-1.0, math.nan, math.inf])
def test_bad_guidance_scale(g):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        fs.solvers.build("euler", VP, 4, guidance_scale=g)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="unknown option.*valid options"):
        fs.solvers.build("euler", VP, 4, ordr=2)


@pytest.mark.parametrize("spec,spacing", [(FLOW, "leading"), (EDM, "linspace"), (EDM, "trailing")])
def test_spacing_that_makes_no_sense_for_the_schedule(spec, spacing):
    with pytest.raises(ValueError, match="makes no sense"):
        fs.solvers.build("euler", spec, 4, spacing=spacing)


def test_explicit_timesteps_validated():
    with pytest.raises(ValueError, match="strictly decreasing"):
        fs.solvers.build("euler", VP, 3, spacing=[10, 500, 999])
    with pytest.raises(ValueError, match="largest valid nfe is 3 .the explicit list has 3 timesteps"):
        fs.solvers.build("euler", VP, 4, spacing=[999, 500, 10])


def test_leading_offset_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        fs.solvers.build("euler", VP, 4, spacing=fs.solvers.Spacing("leading", steps_offset=400))


def test_spec_validation():
    with pytest.raises(ValueError, match="prediction must be one of"):
        fs.ModelSpec(fs.schedules.DiscreteVP(), "eps")
    with pytest.raises(ValueError, match="does not fit"):
        fs.ModelSpec(fs.schedules.DiscreteVP(), "flow")
    with pytest.raises(ValueError, match="time_input"):
        fs.ModelSpec(fs.schedules.Flow(), "flow", time_input="discrete")
    with pytest.raises(ValueError, match="beta_schedule"):
        fs.schedules.DiscreteVP(beta_schedule="cosine")
    with pytest.raises(TypeError, match="DiscreteVP, EDM or Flow"):
        fs.ModelSpec("vp")


def test_every_registered_solver_builds_and_is_finite():
    for name in fs.solvers.available():
        spec = FLOW if name.startswith("flow_") else VP
        nfe = 5
        try:
            prog = fs.solvers.build(name, spec, nfe)
        except ValueError as e:
            assert "nfe" in str(e).lower(), f"{name}: unexpected build error {e}"
            continue
        assert prog.nfe == nfe
        for st in prog.stages:
            assert all(math.isfinite(c) for c in st.matrix.ravel()), name


def test_spacing_defaults_follow_the_diffusers_config():
    diffusers = pytest.importorskip("diffusers")
    # an SD1.5-era DDIM config: steps_offset=1 and no timestep_spacing key -> DDIM's leading grid, offset kept
    cfg = dict(diffusers.DDIMScheduler(steps_offset=1).config)
    cfg.pop("timestep_spacing")
    spec = fs.ModelSpec.from_diffusers_scheduler_config(cfg)
    prog = fs.solvers.build("ddim", spec, 4)
    assert prog.timesteps == tuple(float(t) for t in (751, 501, 251, 1))
    # a flow-matching config asking for karras sigmas gets karras, not the default flow grid
    flow = fs.ModelSpec.from_diffusers_scheduler_config(
        diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, shift=3.0))
    assert fs.solvers.build("flow_euler", flow, 4).options["spacing"] == "karras"
