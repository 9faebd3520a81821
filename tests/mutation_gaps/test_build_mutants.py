"""fs.solvers.build at its boundaries, and guidance carried into the program (gaps found by `make mutate`)."""

import pytest

import fewstep as fs

VP = fs.schedules.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SPEC = fs.ModelSpec(VP, "epsilon")


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m", "unipc"])
def test_one_network_call_is_a_valid_program(name):
    assert fs.solvers.build(name, SPEC, 1).nfe == 1


def test_a_schedule_of_20_train_timesteps_allows_exactly_20_steps():
    spec = fs.ModelSpec(fs.schedules.DiscreteVP(beta_start=0.00085, beta_end=0.012, num_train_timesteps=20),
                        "epsilon")
    assert fs.solvers.build("euler", spec, 20, "leading").nfe == 20
    with pytest.raises(ValueError, match="largest valid nfe is 20"):
        fs.solvers.build("euler", spec, 21, "leading")


@pytest.mark.parametrize("w", [0.0, 0.5, 7.5])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_guidance_scale_reaches_every_call(name, w):
    # classifier-free guidance: O_u + w (O_c - O_u) = (1 - w) O_u + w O_c wherever the output is read
    prog = fs.solvers.build(name, SPEC, 4, guidance_scale=w)
    assert prog.guidance_scale == w
    for stage in prog.stages:
        if stage.call is None:
            continue
        reads = [o for o in stage.outputs if stage.coef(o, "O_c") != 0.0 or stage.coef(o, "O_u") != 0.0]
        assert reads, f"stage {stage.call} does not read the network output"
        for out in reads:
            cu, cc = stage.coef(out, "O_u"), stage.coef(out, "O_c")
            assert cu * w == pytest.approx(cc * (1 - w), rel=1e-12, abs=1e-15 * abs(cu + cc))


def test_without_guidance_no_unconditional_output_is_read():
    prog = fs.solvers.build("dpmpp_2m", SPEC, 4)
    assert prog.guidance_scale is None
    assert all("O_u" not in s.inputs for s in prog.stages)
