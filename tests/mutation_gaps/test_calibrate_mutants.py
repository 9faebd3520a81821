"""Calibrator details that `make mutate` found untested: ranges below 1, steps that saw only zeros, the
percentile method (exact order statistics, subsampling of large inputs), and static-scale tensors that must
keep their address (plans and CUDA graphs captured earlier read them)."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from fewstep.quant import Calibrator, FP8Linear  # noqa: E402
from fewstep.quant.calibrate import _MAX_SAMPLE  # noqa: E402


def _net():
    torch.manual_seed(0)
    return nn.Sequential(FP8Linear.from_linear(nn.Linear(32, 16), backend="emulated"))


def _calibrate(net, ranges, cal=None):
    """One call per timestep; the input's absmax is ``ranges[i]`` (written in by hand: the oracle)."""
    with (cal or Calibrator(net, nfe=len(ranges))) as c:
        fn = c.wrap(lambda x: net(x))
        for r in ranges:
            x = -torch.rand(4, 32) * 0.5 * r
            x[1, 2] = r
            fn(x)
    return c


def test_wrap_exposes_the_wrapped_function():
    def f(x):
        return x

    assert Calibrator(_net(), nfe=1).wrap(f).__wrapped__ is f


def test_ranges_below_one():
    net = _net()
    cal = _calibrate(net, [0.25, 0.125])
    assert cal.stats["0"] == [0.25, 0.125]
    cal.finish("max")
    assert net[0].act_scale.item() == pytest.approx(0.25 / 448, rel=1e-6)
    cal.finish("mean")
    assert net[0].act_scale.item() == pytest.approx(0.1875 / 448, rel=1e-6)


def test_a_step_that_saw_only_zeros_is_left_out_of_the_mean():
    net = _net()
    cal = _calibrate(net, [0.0, 2.0])
    assert cal.stats["0"] == [0.0, 2.0]
    cal.finish("mean")
    assert net[0].act_scale.item() == pytest.approx(2.0 / 448, rel=1e-6)


def test_a_layer_that_saw_only_zeros_gets_a_tiny_scale():
    net = _net()
    _calibrate(net, [0.0, 0.0]).finish("max")
    assert 0 < net[0].act_scale.item() <= 1e-12 / 448 * (1 + 1e-6)


def test_a_static_scale_tensor_keeps_its_address():
    net = _net()
    net[0].set_act_scale(0.5)
    t = net[0].act_scale
    cal = _calibrate(net, [3.0])
    assert net[0].act_scale is None or net[0].act_scale is t
    cal.finish("max")
    assert net[0].act_scale is t and t.item() == pytest.approx(3.0 / 448, rel=1e-6)


def test_finish_inside_the_context_fills_the_static_scale_tensor():
    """finish() may run before the context exits (the layer's scale is then None, its tensor kept aside): the
    static scale tensor captured plans read gets the new value in place, and stays after the exit."""
    net = _net()
    net[0].set_act_scale(0.5)
    t = net[0].act_scale
    with Calibrator(net, nfe=1) as cal:
        assert net[0].act_scale is None  # dynamic scales while observing
        x = torch.rand(4, 32) * 0.5
        x[2, 3] = -3.0
        cal.wrap(lambda v: net(v))(x)
        cal.finish("max")
        assert net[0].act_scale is t and t.item() == pytest.approx(3.0 / 448, rel=1e-6)
    assert net[0].act_scale is t and t.item() == pytest.approx(3.0 / 448, rel=1e-6)


def test_a_second_finish_fills_the_first_ones_tensor():
    net = _net()
    cal = _calibrate(net, [3.0])
    cal.finish("max")
    t = net[0].act_scale
    _calibrate(net, [6.0], cal=cal)  # more calibration data, then finish again
    cal.finish("max")
    assert net[0].act_scale is t and t.item() == pytest.approx(6.0 / 448, rel=1e-6)


def _range(x, **kw):
    return Calibrator(_net(), nfe=1, **kw)._range(x)


def test_percentile_is_the_exact_order_statistic():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(1, 1001, dtype=torch.float32)[torch.randperm(1000, generator=g)]
    x[::2] *= -1  # |x| is ranked
    # the 99th percentile of |x| = 1..1000 is the 990th smallest value, 990 (nearest-rank definition)
    assert _range(x, method="percentile", percentile=99.0) == 990.0
    assert _range(x, method="percentile", percentile=50.0) == 500.0
    assert _range(torch.tensor([-0.75]), method="percentile", percentile=50.0) == 0.75


def test_absmax_ignores_the_percentile():
    x = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    x[123] = -40.0  # one outlier: the 99.99th percentile of 20000 values is the second largest
    assert _range(x, method="absmax") == 40.0
    assert _range(x, method="absmax", percentile=50.0) == 40.0


def test_percentile_of_a_large_input_is_close_to_the_exact_one():
    n = 2 * _MAX_SAMPLE + 2  # subsampled with stride 3
    x = torch.arange(n, dtype=torch.float32)
    got = _range(x, method="percentile", percentile=99.0)
    assert abs(got - 0.99 * n) <= 1e-4 * n, got


def test_percentile_100_of_a_large_input_is_its_max():
    n = 2 * _MAX_SAMPLE + 2
    x = torch.zeros(n)
    x[1] = -5.0  # not on the stride-3 subsample
    assert _range(x, method="percentile", percentile=100.0) == 5.0
