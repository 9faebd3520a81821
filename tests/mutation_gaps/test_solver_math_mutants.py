"""The shared solver math of fewstep/solvers/_math.py against its oracles (gaps found by `make mutate`, group
solvers_other): diffusers' EulerDiscreteScheduler.init_noise_sigma, Karras et al.'s EDM start, mpmath's exp,
and the order rules of diffusers' multistep schedulers written out as tables."""

import math

import mpmath
import pytest

import fewstep as fs
from fewstep.solvers._math import expm1_neg, init_scale, multistep_order
from fewstep.solvers.schedules import Point

VP = fs.schedules.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _vp_point(sigma_k: float) -> Point:
    """The VP point of k-diffusion sigma ``sigma_k``: alpha = 1 / sqrt(1 + s^2), sigma = s alpha."""
    a = 1.0 / math.sqrt(1.0 + sigma_k * sigma_k)
    return Point(a, sigma_k * a, 999.0)


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading"])
def test_vp_euler_family_starts_like_diffusers_euler(spacing):
    # EulerDiscreteScheduler starts at init_noise_sigma * noise in k-diffusion space: sigma_max for linspace /
    # trailing, sqrt(sigma_max^2 + 1) for leading; in VP space that is divided by sqrt(1 + sigma_max^2)
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing=spacing, steps_offset=int(spacing == "leading"))
    sch.set_timesteps(10)
    smax = float(sch.sigmas.max())
    want = float(sch.init_noise_sigma) / math.sqrt(1.0 + smax * smax)
    got = init_scale(fs.ModelSpec(VP, "epsilon"), _vp_point(smax), spacing, "euler")
    # diffusers computes sqrt(sigma_max^2 + 1) in float32 (measured 2.2e-8 off the float64 value): one float32
    # ulp, 1.2e-7; the two start rules differ by 2.3e-3 here
    assert got == pytest.approx(want, rel=1.2e-7)
    assert (want == pytest.approx(1.0, rel=1e-6)) == (spacing == "leading")


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading", "karras"])
def test_vp_multistep_family_starts_at_the_vp_marginal(spacing):
    # DPMSolverMultistep / UniPC / DEIS / DDIM: init_noise_sigma = 1 (x_T ~ N(0, I) in VP space)
    spec = fs.ModelSpec(VP, "epsilon")
    assert init_scale(spec, _vp_point(14.6), spacing) == 1.0
    assert init_scale(spec, _vp_point(14.6), spacing, "multistep") == 1.0


@pytest.mark.parametrize("family", ["multistep", "euler"])
def test_edm_starts_at_sigma_max(family):
    # Karras et al. 2022, Alg. 1-2: x_0 ~ N(0, sigma_max^2 I)
    spec = fs.ModelSpec(fs.schedules.EDM(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5), "sample")
    assert init_scale(spec, Point(1.0, 80.0, 80.0), "karras", family) == 80.0


@pytest.mark.parametrize("family", ["multistep", "euler"])
def test_flow_starts_at_unit_noise(family):
    # rectified flow: x_1 = noise (t = 1 is pure noise)
    spec = fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow")
    assert init_scale(spec, Point(0.0, 1.0, 1000.0), "flow", family) == 1.0


@pytest.mark.parametrize("h", [1e-12, 1e-5, 0.3, 1.0, 7.5, 40.0, -0.2])
def test_expm1_neg_is_exp_minus_one(h):
    want = float(mpmath.expm1(-mpmath.mpf(h)))
    assert expm1_neg(h) == pytest.approx(want, rel=4e-16)  # math.expm1 is correctly rounded to ~1 ulp


def test_expm1_neg_at_infinity_is_minus_one():
    assert expm1_neg(math.inf) == -1.0


# diffusers' DEISMultistepScheduler / UniPCMultistepScheduler: step i uses min(order, i + 1) outputs;
# lower_order_final lowers the last steps to the outputs left (n - i); euler_at_final makes the last step
# first order; neither is the default
@pytest.mark.parametrize("order,n,lower,euler,want", [
    (3, 6, False, False, [1, 2, 3, 3, 3, 3]),
    (3, 6, True, False, [1, 2, 3, 3, 2, 1]),
    (3, 6, False, True, [1, 2, 3, 3, 3, 1]),
    (2, 4, True, True, [1, 2, 2, 1]),
    (2, 1, False, False, [1]),
    (1, 3, False, False, [1, 1, 1]),
])
def test_multistep_order_rules(order, n, lower, euler, want):
    assert [multistep_order(order, i, n, lower_final=lower, euler_at_final=euler) for i in range(n)] == want


def test_multistep_order_takes_no_euler_step_unless_asked():
    assert [multistep_order(3, i, 5, lower_final=False) for i in range(5)] == [1, 2, 3, 3, 3]
