"""iPNDM's step loop (``ipndm`` in fewstep/solvers/algo_ipndm.py) where the parity suite did not reach (gaps
found by `make mutate`, group solvers_other).

Oracles: k-diffusion's sample_ipndm written out in float64 (tests/solvers/test_ipndm_parity.py), the
lower-order rule of diffusers' multistep schedulers (lowered only below 15 steps), and the reason each
unusable combination is refused.
"""

import pytest
import torch

import fewstep as fs
from fewstep.solvers.reference import run_reference

from ..solvers.harness import rel_err, toy_model
from ..solvers.test_ipndm_parity import VP, _kdiffusion_ipndm, _noise


@pytest.mark.parametrize("nfe, lowered", [(14, True), (15, False)])
def test_lower_order_final_only_below_15_steps(nfe, lowered):
    """DPMSolverMultistepScheduler lowers the final orders when ``lower_order_final and len(timesteps) < 15``;
    iPNDM follows that rule, so at 15 steps order 4 runs to the end, as k-diffusion's loop does."""
    spec = fs.ModelSpec(VP, "epsilon")
    prog = fs.solvers.build("ipndm", spec, nfe, lower_order_final=True)
    orders = [st.info["order"] for st in prog.stages[1:]]
    assert orders == [min(4, i + 1, nfe - i if lowered else 4) for i in range(nfe)]
    grid = fs.solvers.make_grid(spec, fs.solvers.Spacing("linspace"), nfe, family="multistep")
    ref = _kdiffusion_ipndm(spec, grid, toy_model, _noise(nfe), 4)
    err = rel_err(run_reference(prog, toy_model, _noise(nfe)), ref)
    # measured 3.5e-16 at 15 steps (float64 on both sides, lower_order_final unused there); 29x margin.
    # At 14 steps the lowered final orders move the sample off k-diffusion's order-4 run by 2.0e-3
    assert (err <= 1e-14) == (not lowered)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_history_is_at_most_the_order(order):
    """Adams-Bashforth of order k combines the newest noise prediction with k - 1 older ones (k-diffusion
    keeps k - 1 in its buffer); the plan keeps at most k history registers (each one latent per sample)."""
    prog = fs.solvers.build("ipndm", fs.ModelSpec(VP, "epsilon"), 8, order=order)
    assert prog.history_size <= order


def test_ipndm_grid_refuses_epsilon_for_its_own_reason():
    """IPNDMScheduler treats the network as v-prediction; an epsilon network is refused for that, not for the
    later pure-noise check."""
    with pytest.raises(ValueError, match="needs a VP spec with v_prediction or sample prediction"):
        fs.solvers.build("ipndm", fs.ModelSpec(VP, "epsilon"), 4, grid="ipndm")


def test_epsilon_network_from_pure_noise_is_refused():
    """A flow grid starts at t = 1 (alpha = 0), where x0 = (x - sigma eps) / alpha has no value."""
    spec = fs.ModelSpec(fs.schedules.Flow(shift=3.0), "epsilon")
    with pytest.raises(ValueError, match="no x0 at a pure-noise point"):
        fs.solvers.build("ipndm", spec, 4, "flow")
    flow = fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow")  # the same grid, x0 from the network
    x = run_reference(fs.solvers.build("ipndm", flow, 4, "flow"), toy_model, _noise(4))
    assert torch.isfinite(x).all()
