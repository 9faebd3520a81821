import numpy as np
import pytest
import torch

import fewstep as fs
from fewstep.solvers.reference import count_calls
from fewstep.solvers.schedules import EDM, DiscreteVP, Flow

from .harness import guided_toy_model, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")


def _noise(seed, shape=(2, 3, 4, 5)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flow_loop(sch, model, noise, steps, guidance=None, set_timesteps=True, **set_kw):
    """diffusers' flow-matching pipeline loop (SD3 / Flux): no input scaling, x starts as the noise."""
    if set_timesteps:
        sch.set_timesteps(steps, **set_kw)
    x, times = noise.clone(), []
    for t in sch.timesteps:
        if guidance is None:
            out = model(x.double(), float(t))
        else:
            u, c = model(torch.cat([x, x]).double(), float(t)).chunk(2)
            out = u + guidance * (c - u)
        times.append(float(t))
        x = sch.step(out, t, x).prev_sample
    return x, times


def _compare(prog, sch, steps, guidance=None, mu=None):
    model = toy_model if guidance is None else guided_toy_model
    noise = _noise(prog.nfe)
    ref, times = flow_loop(sch, model, noise, steps, guidance, **({} if mu is None else {"mu": mu}))
    fn, seen = count_calls(model)
    ours = fs.solvers.run_reference(prog, fn, noise)
    assert len(seen) == prog.nfe == len(times)
    assert seen == pytest.approx(times, abs=1e-3)
    # measured 1.5e-7 (float32 diffusers sigmas); 4x margin
    assert rel_err(ours, ref) <= 6e-7


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("spacing", ["flow", "karras", "exponential", "beta"])
@pytest.mark.parametrize("nfe", [1, 2, 5])
def test_flow_euler_matches_diffusers(shift, spacing, nfe):
    spec = fs.ModelSpec(Flow(shift=shift), "flow")
    prog = fs.solvers.build("flow_euler", spec, nfe, spacing)
    sch = fs.solvers.to_diffusers("flow_euler", spec, spacing)
    assert type(sch).__name__ == "FlowMatchEulerDiscreteScheduler"
    _compare(prog, sch, nfe)


@pytest.mark.parametrize("mu", [0.5, 1.15])
@pytest.mark.parametrize("nfe", [1, 4])
def test_flow_euler_dynamic_shift_matches_diffusers(mu, nfe):
    spec = fs.ModelSpec(Flow(mu=mu), "flow")
    prog = fs.solvers.build("flow_euler", spec, nfe)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    _compare(prog, sch, nfe, mu=mu)


def test_flow_euler_guidance_matches_diffusers():
    spec = fs.ModelSpec(Flow(shift=3.0), "flow")
    prog = fs.solvers.build("flow_euler", spec, 4, guidance_scale=5.0)
    _compare(prog, fs.solvers.to_diffusers("flow_euler", spec), 4, guidance=5.0)


def test_flow_grid_is_the_schedulers_double_shift():
    """With a static shift FlowMatchEuler spaces timesteps between its already-shifted sigma table ends and
    shifts again; our grid must follow it (this would fail for a grid linspace(1, 1/T) shifted once)."""
    spec = fs.ModelSpec(Flow(shift=3.0), "flow")
    sch = fs.solvers.to_diffusers("flow_euler", spec)
    sch.set_timesteps(6)
    prog = fs.solvers.build("flow_euler", spec, 6)
    assert prog.timesteps == pytest.approx(sch.timesteps.tolist(), rel=1e-6)
    assert [c.point.sigma for c in prog.calls] == pytest.approx(sch.sigmas[:-1].tolist(), rel=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_flow_heun_matches_diffusers(shift, steps, guidance):
    spec = fs.ModelSpec(Flow(shift=shift), "flow")
    prog = fs.solvers.build("flow_heun", spec, 2 * steps - 1, guidance_scale=guidance)
    sch = fs.solvers.to_diffusers("flow_heun", spec)
    assert type(sch).__name__ == "FlowMatchHeunDiscreteScheduler"
    _compare(prog, sch, steps, guidance)


@pytest.mark.parametrize("spacing,mu", [("karras", None), ("beta", None), ("flow", 0.8)])
def test_flow_heun_on_other_grids_matches_diffusers(spacing, mu):
    """FlowMatchHeun only has the plain shifted grid; give it FlowMatchEuler's sigmas for the others."""
    steps = 3
    spec = fs.ModelSpec(Flow(shift=2.0, mu=mu), "flow")
    prog = fs.solvers.build("flow_heun", spec, 2 * steps - 1, spacing)
    flags = {f"use_{spacing}_sigmas": True} if spacing != "flow" else {}
    grid_src = diffusers.FlowMatchEulerDiscreteScheduler(shift=2.0, use_dynamic_shifting=mu is not None,
                                                         **flags)
    grid_src.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    sch = diffusers.FlowMatchHeunDiscreteScheduler(shift=2.0)
    sch.set_timesteps(steps)
    sig, ts = grid_src.sigmas, grid_src.timesteps
    sch.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
    sch.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
    model, noise = toy_model, _noise(7)
    ref, times = flow_loop(sch, model, noise, steps, set_timesteps=False)
    fn, seen = count_calls(model)
    ours = fs.solvers.run_reference(prog, fn, noise)
    assert len(seen) == prog.nfe == len(times)
    assert seen == pytest.approx(times, abs=1e-3)
    # measured 5.1e-8 (float32 diffusers sigmas); 6x margin
    assert rel_err(ours, ref) <= 3e-7


def test_karras_space_heun_points_flow_specs_to_flow_heun():
    with pytest.raises(ValueError, match="use flow_heun"):
        fs.solvers.build("heun", fs.ModelSpec(Flow(shift=3.0), "flow"), 5)


@pytest.mark.parametrize("name,nfe", [("flow_euler", 4), ("flow_heun", 5)])
def test_flow_solvers_sample_prediction_matches_flow_prediction(name, nfe):
    """A flow spec whose network predicts x0 gives the samples of the equivalent v network."""
    def as_pred(x, t):  # v = eps - x0 and x = x0 + t v  =>  x0 = x - t v
        return x - t / 1000.0 * toy_model(x, t)

    noise = _noise(5)
    prog_p = fs.solvers.build(name, fs.ModelSpec(Flow(shift=3.0), "sample"), nfe)
    prog_v = fs.solvers.build(name, fs.ModelSpec(Flow(shift=3.0), "flow"), nfe)
    ours = fs.solvers.run_reference(prog_p, as_pred, noise)
    ref = fs.solvers.run_reference(prog_v, toy_model, noise)
    # measured 3.8e-15 (float64 on both sides); 13x margin
    assert rel_err(ours, ref) <= 5e-14


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun"])
@pytest.mark.parametrize("sched", [DiscreteVP(), EDM()])
def test_flow_solvers_reject_non_flow_specs(name, sched):
    with pytest.raises(ValueError, match="needs a Flow schedule"):
        fs.solvers.build(name, fs.ModelSpec(sched), 3)


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun"])
def test_flow_epsilon_prediction_at_pure_noise_is_a_clear_error(name):
    with pytest.raises(ValueError, match="no x0 information at t = 1"):
        fs.solvers.build(name, fs.ModelSpec(Flow(shift=3.0), "epsilon"), 3)


def test_flow_heun_even_nfe_is_a_clear_error():
    with pytest.raises(ValueError, match=r"nfe must be odd"):
        fs.solvers.build("flow_heun", fs.ModelSpec(Flow(shift=3.0), "flow"), 4)


def test_flow_spacing_is_one_grid_for_every_euler_family_solver():
    """spacing.py's 'flow' grid is FlowMatchEuler's: euler on a Flow spec is flow_euler, step for step."""
    for shift, mu in ((3.0, None), (1.0, 0.7)):
        spec = fs.ModelSpec(fs.schedules.Flow(shift=shift, mu=mu), "flow")
        a, b = fs.solvers.build("euler", spec, 6, "flow"), fs.solvers.build("flow_euler", spec, 6, "flow")
        assert a.timesteps == b.timesteps and a.sigmas == b.sigmas
        for sa, sb in zip(a.stages, b.stages):
            assert (sa.inputs, sa.outputs) == (sb.inputs, sb.outputs)
            assert np.allclose(sa.matrix, sb.matrix, rtol=1e-12, atol=0)
