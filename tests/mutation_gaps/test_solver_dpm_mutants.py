"""DPM-Solver++ helpers at the edges of their domain (gaps found by `make mutate`, group dpm).

Oracles: the integrals that define the exponential-integrator weights, evaluated in closed form with mpmath at
50 digits, and the limits ``_ratio``'s docstring states.
"""

import math

import mpmath
import pytest

from fewstep.solvers.algo_dpm import _phis, _ratio

mpmath.mp.dps = 50


def _weights(g: float) -> tuple[float, float, float]:
    """``phi1 = int_0^g e^-(g-u) du``, ``w_k = int_0^g (u/g)^k / k! e^-(g-u) du`` (k = 1, 2), closed forms."""
    g = mpmath.mpf(g)
    phi1 = -mpmath.expm1(-g)
    return float(phi1), float(1 - phi1 / g), float((phi1 - g) / g**2 + mpmath.mpf(1) / 2)


def test_weights_of_a_zero_length_step_are_zero():
    # every weight is an integral over [0, g]: all vanish at g = 0, and the closed forms tend to 0
    # (phi1 ~ g, w1 ~ g / 2, w2 ~ g / 6)
    assert _phis(0.0) == (0.0, 0.0, 0.0)
    assert _weights(1e-12) == pytest.approx((1e-12, 0.5e-12, 1e-12 / 6), rel=1e-11)


def test_weights_of_a_step_to_sigma_zero_are_the_limits():
    # g = inf (lambda_t = inf): phi1 -> 1, w1 = 1 - phi1 / g -> 1, w2 = (phi1 - g) / g^2 + 1/2 -> 1/2;
    # at g = 1e15 the closed forms are within 1e-15 of those limits
    assert _phis(math.inf) == (1.0, 1.0, 0.5)
    assert _weights(1e15) == pytest.approx((1.0, 1.0, 0.5), rel=0, abs=1e-14)


def test_ratio_is_the_quotient_of_finite_step_sizes():
    assert _ratio(3.0, 1.0) == 3.0
    assert _ratio(-0.75, 0.5) == -1.5


def test_ratio_from_a_zero_snr_point_is_infinite():
    # a history point at lambda = -inf: num = inf over a finite step, so its divided difference vanishes
    assert _ratio(math.inf, 0.5) == math.inf


def test_ratio_of_two_steps_from_the_same_zero_snr_start_is_one():
    assert _ratio(math.inf, math.inf) == 1.0


@pytest.mark.parametrize("num,den", [(1.0, 0.0), (0.0, 0.0), (-math.inf, math.inf)])
def test_degenerate_ratio_is_a_value_error(num, den):
    with pytest.raises(ValueError, match="degenerate step sizes"):
        _ratio(num, den)
