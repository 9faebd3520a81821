"""Spacing formulas against their published closed forms, in float64 (gaps found by `make mutate`)."""

import math

import numpy as np
import pytest
import torch

import fewstep as fs
from fewstep.solvers.spacing import _flow_shift, karras_sigmas, loglinear_interp


def test_karras_default_rho_is_the_papers_7():
    # Karras et al. 2022, eq. 5 with rho = 7 (their Table 1), written out here
    smin, smax, n = 0.002, 80.0, 6
    i = np.arange(n)
    want = (smax ** (1 / 7) + i / (n - 1) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    np.testing.assert_allclose(karras_sigmas(smin, smax, n), want, rtol=1e-14, atol=0)


def test_loglinear_interp_works_in_float64_for_float32_tables():
    # AYS tables may come as float32 arrays; the log-space resampling must not round them to float32 first
    table = np.array([14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
                     dtype=np.float32)
    n = 7
    xs, new_x = np.linspace(0, 1, len(table)), np.linspace(0, 1, n)
    ys = [math.log(float(v)) for v in table[::-1]]
    want = np.array([math.exp(np.interp(x, xs, ys)) for x in new_x])[::-1]
    got = loglinear_interp(table, n)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


T = np.array([1e-3, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999])


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_shift_static(shift):
    # SD3 (Esser et al. 2024, eq. 23): t' = shift t / (1 + (shift - 1) t)
    want = np.array([shift * t / (1 + (shift - 1) * t) for t in T])
    np.testing.assert_allclose(_flow_shift(fs.schedules.Flow(shift=shift), T), want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("mu", [0.5, 1.15, -0.3])
def test_flow_shift_dynamic_ignores_shift(mu):
    # Flux's dynamic shifting (diffusers' time_shift, exponential, sigma power 1): e^mu / (e^mu + (1/t - 1))
    want = np.array([math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in T])
    got = _flow_shift(fs.schedules.Flow(shift=3.0, mu=mu), T)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


def test_flow_shift_keeps_float32_tensors_float32():
    t = torch.tensor(T, dtype=torch.float32)
    got = _flow_shift(fs.schedules.Flow(shift=3.0), t)
    assert got.dtype == torch.float32
    want = 3.0 * T / (1 + 2.0 * T)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-7, atol=0)
