import pytest
import torch

import fewstep as fs
from fewstep.solvers import Spacing
from fewstep.solvers.schedules import DiscreteVP

from .harness import assert_matches_diffusers, guided_toy_model, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")

SCHED = DiscreteVP(beta_schedule="scaled_linear")


def _noise(seed, shape=(2, 3, 4, 5)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check(spec, spacing, steps, guidance=None, **set_kw):
    """Heun with `steps` grid steps (2 steps - 1 calls) against HeunDiscreteScheduler."""
    nfe = 2 * steps - 1
    prog = fs.solvers.build("heun", spec, nfe, spacing, guidance_scale=guidance)
    sch = fs.solvers.to_diffusers("heun", spec, spacing)
    assert type(sch).__name__ == "HeunDiscreteScheduler"
    model = toy_model if guidance is None else guided_toy_model
    noise = _noise(steps)
    assert prog.nfe == nfe
    # measured 8.5e-7 (float32 diffusers sigmas); 4.7x margin
    assert_matches_diffusers(sch, prog, model, noise, steps, rtol=4e-6, guidance_scale=guidance,
                             what=f"heun {spacing}")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras", "exponential", "beta"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_heun_matches_diffusers(pred, spacing, steps):
    sp = Spacing(spacing, steps_offset=1) if spacing == "leading" else spacing
    _check(fs.ModelSpec(SCHED, pred), sp, steps)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_heun_guidance_matches_diffusers(pred):
    _check(fs.ModelSpec(SCHED, pred), "karras", 3, guidance=4.5)


def test_heun_other_beta_schedule():
    _check(fs.ModelSpec(DiscreteVP(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)), "trailing", 3)


@pytest.mark.parametrize("nfe", [2, 4, 10])
def test_heun_even_nfe_is_a_clear_error(nfe):
    with pytest.raises(ValueError, match=r"odd \(1, 3, 5"):
        fs.solvers.build("heun", fs.ModelSpec(SCHED), nfe)


def test_heun_to_sigma_min_is_all_heun_steps():
    spec = fs.ModelSpec(SCHED)
    prog = fs.solvers.build("heun", spec, 4, "karras", final="sigma_min")
    assert [s.info.get("order") for s in prog.stages if s.call is not None] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"even \(2, 4"):
        fs.solvers.build("heun", spec, 5, final="sigma_min")
    # euler_at_final: the last step is Euler again, so odd NFEs
    prog = fs.solvers.build("heun", spec, 5, final="sigma_min", euler_at_final=True)
    assert prog.stages[-1].info.get("order") == 1


def test_heun_is_second_order_on_edm():
    """A step of the corrector differs from Euler (else the 2nd call did nothing), and the final sample
    converges faster than Euler's on a smooth model as the grid refines."""
    spec = fs.ModelSpec(fs.schedules.EDM(), "epsilon")
    noise = _noise(0)

    def model(x, t):
        return 0.3 * torch.tanh(x) + 0.01 * t ** 0.5 * torch.roll(x, 1, -1) / (1 + t)

    exact = fs.solvers.run_reference(fs.solvers.build("heun", spec, 2 * 400 - 1), model, noise)
    err_h = [rel_err(fs.solvers.run_reference(fs.solvers.build("heun", spec, 2 * n - 1), model, noise), exact)
             for n in (8, 16)]
    err_e = [rel_err(fs.solvers.run_reference(fs.solvers.build("euler", spec, n), model, noise), exact)
             for n in (8, 16)]
    assert err_h[1] < err_e[1] and err_h[0] / err_h[1] > err_e[0] / err_e[1]

