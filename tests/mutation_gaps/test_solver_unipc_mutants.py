"""UniPC across two distinct but close noise levels (a gap found by `make mutate`, group unipc).

A step between two grid points is skipped only where the end point repeats (karras + final="sigma_min", whose
float32 sigmas are equal); explicit float64 sigmas 5e-10 apart are a real step.  Oracle: UniPC of order 1
without corrector is DPM-Solver++(1) = DDIM, written out here in float64.
"""

import torch

import fewstep as fs
from fewstep.solvers.reference import run_reference
from fewstep.solvers.spacing import Spacing

EDM = fs.schedules.EDM(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)


def _net(x: torch.Tensor, t) -> torch.Tensor:
    return 0.5 * torch.tanh(x) + 0.1 * torch.roll(x, 1, -1)


def test_a_step_between_sigmas_5e_10_apart_is_taken():
    sig = (10.0, 2.0, 1.0, 1.0 - 5e-10, 0.5, 0.0)
    prog = fs.solvers.build("unipc", fs.ModelSpec(EDM, "sample"), 5, Spacing("sigmas", values=sig), order=1,
                            corrector=False)
    noise = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = run_reference(prog, _net, noise)
    x = sig[0] * noise  # EDM: x_T = sigma_max * noise
    for s, t in zip(sig, sig[1:]):
        x = (t / s) * x + (1 - t / s) * _net(x, s)  # DDIM in EDM variables (alpha = 1)
    # measured 0 (bit-equal); skipping the 5e-10 step is off by 1.6e-10
    assert float((got - x).norm() / x.norm()) <= 1e-13
