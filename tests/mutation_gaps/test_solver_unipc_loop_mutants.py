"""UniPC's step loop (``unipc`` in fewstep/solvers/algo_unipc.py) where the parity suite did not reach (gaps
found by `make mutate`, group unipc).

Oracle: diffusers' UniPCMultistepScheduler on the same float64 sigma table, run by its own loop
(tests/solvers/harness.py), with its corrector calls recorded.
"""

import pytest
import torch

import fewstep as fs
from fewstep.solvers.reference import count_calls, run_reference

from ..solvers.harness import assert_matches_diffusers, diffusers_sample, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")

VP = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
FLOW = fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow")


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _corrector_steps(sch) -> list[int]:
    """Record the step index of every UniC call diffusers makes."""
    steps, orig = [], sch.multistep_uni_c_bh_update

    def uni_c(*args, **kwargs):
        steps.append(int(sch.step_index))
        return orig(*args, **kwargs)

    sch.multistep_uni_c_bh_update = uni_c
    return steps


def _table(sch, sigmas=None):
    """After every set_timesteps: diffusers' sigma table in float64 (or replaced by ``sigmas``), so the
    comparison is of the algorithms, not of float32 rounding (tests/solvers/test_unipc_parity.py)."""
    orig = sch.set_timesteps

    def set_timesteps(*args, **kwargs):
        orig(*args, **kwargs)
        if sigmas is None:
            sch.sigmas = sch.sigmas.double()
        else:
            sch.sigmas = torch.tensor(sigmas, dtype=torch.float64)
            sch.timesteps = torch.tensor(sigmas[:-1], dtype=torch.float64) * 1000  # flow: t = 1000 sigma

    sch.set_timesteps = set_timesteps
    return sch


@pytest.mark.parametrize("opts", [dict(), dict(disable_corrector=(1, 3)), dict(order=3, corrector=False)])
def test_stage_info_names_the_steps_diffusers_corrects(opts):
    """``describe()`` shows per stage whether UniC ran: the stage after call i is marked exactly when
    diffusers calls its corrector at step i."""
    spec = fs.ModelSpec.from_diffusers_scheduler_config(dict(VP, prediction_type="epsilon"))
    prog = fs.solvers.build("unipc", spec, 6, "trailing", **opts)
    sch = _table(fs.solvers.to_diffusers("unipc", spec, "trailing", **opts))
    steps = _corrector_steps(sch)
    diffusers_sample(sch, toy_model, _noise(1), 6)
    assert [st.info["corrector"] for st in prog.stages[1:]] == [i in steps for i in range(6)]


def test_flow_linspace_is_unipc_flow_grid():
    """A flow model on 'linspace' gets UniPC's own flow grid (diffusers' use_flow_sigmas with timestep_spacing
    'linspace', which is what to_diffusers returns for it)."""
    sch = fs.solvers.to_diffusers("unipc", FLOW, "linspace")
    assert sch.config.use_flow_sigmas and sch.config.timestep_spacing == "linspace"
    sch.register_to_config(flow_shift=3.0)
    prog = fs.solvers.build("unipc", FLOW, 5, "linspace")
    # measured 7.2e-16 (float64 on both sides); 14x margin
    assert_matches_diffusers(_table(sch), prog, toy_model, _noise(5), 5, rtol=1e-14, what="flow linspace")


SIGMAS = [1.0, 0.6, 0.3, 0.1, 0.05, 0.02, 0.0]  # a flow table that starts at pure noise (alpha = 0)


def test_no_corrector_after_a_pure_noise_point():
    """The sample stepped from a pure-noise point (flow sigma 1, lambda = -inf) is not corrected: UniC over an
    infinite step has B(h) = h = -inf for bh1 (diffusers: NaN).  Oracle: diffusers on the same float64 table
    with that one correction disabled through its own ``disable_corrector``; order 1, so the predictor never
    interpolates through the pure-noise point (diffusers would, with lambda = -inf in its ratios)."""
    prog = fs.solvers.build("unipc", FLOW, 6, fs.solvers.Spacing("sigmas", values=SIGMAS), order=1)
    sch = _table(fs.solvers.to_diffusers("unipc", FLOW, "flow", order=1), SIGMAS)
    sch.disable_corrector = [0]
    steps = _corrector_steps(sch)
    ref, times = diffusers_sample(sch, toy_model, _noise(3), 6)
    fn, seen = count_calls(toy_model)
    ours = run_reference(prog, fn, _noise(3))
    assert seen == pytest.approx(times)
    assert steps == [2, 3, 4, 5]
    assert [st.info["corrector"] for st in prog.stages[1:]] == [i in steps for i in range(6)]
    # measured 6.5e-16 (float64 on both sides); 15x margin.  Correcting at step 1 moves the sample by 2.8e-2
    assert rel_err(ours, ref) <= 1e-14


@pytest.mark.parametrize("order", [1, 2, 3])
def test_history_is_at_most_the_order(order):
    """diffusers' UniPCMultistepScheduler carries ``solver_order`` model outputs from step to step
    (``model_outputs``); the plan keeps as many history registers (each one latent per sample), no more."""
    spec = fs.ModelSpec.from_diffusers_scheduler_config(dict(VP, prediction_type="epsilon"))
    sch = fs.solvers.to_diffusers("unipc", spec, "trailing", order=order)
    sch.set_timesteps(8)
    prog = fs.solvers.build("unipc", spec, 8, "trailing", order=order)
    assert prog.history_size <= len(sch.model_outputs) == order
