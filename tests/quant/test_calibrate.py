"""Calibrator: per-layer, per-timestep input ranges, combined into static per-tensor scales."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from fewstep.quant import Calibrator, FP8Linear  # noqa: E402


def _net():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    return nn.Sequential(FP8Linear.from_linear(lin, backend="emulated"))


def _run(cal, net, ranges):
    fn = cal.wrap(lambda x: net(x))
    for r in ranges:  # one call per timestep; the input's absmax is r
        x = torch.rand(4, 32) * 0.5 * r
        x[0, 0] = r
        fn(x)


def test_per_timestep_absmax_max_and_mean():
    net = _net()
    with Calibrator(net, nfe=3) as cal:
        _run(cal, net, [1.0, 4.0, 2.0])  # sample 1
        _run(cal, net, [3.0, 0.5, 2.5])  # sample 2
    assert cal.stats["0"] == [3.0, 4.0, 2.5]  # per timestep, max over samples
    cal.finish("mean")
    assert net[0].act_scale.item() == pytest.approx((3.0 + 4.0 + 2.5) / 3 / 448)
    cal.finish("max")
    assert net[0].act_scale.item() == pytest.approx(4.0 / 448)
    assert net[0].observer is None


def test_percentile_is_below_absmax():
    net = _net()
    with Calibrator(net, nfe=1, method="percentile", percentile=50.0) as cal:
        _run(cal, net, [8.0])
    assert 0 < cal.stats["0"][0] < 8.0


def test_bad_options_and_missing_layers():
    net = _net()
    with pytest.raises(ValueError, match="method"):
        Calibrator(net, 2, method="mse")
    with pytest.raises(ValueError, match="percentile"):
        Calibrator(net, 2, method="percentile", percentile=0)
    with Calibrator(net, 2) as cal:
        pass
    with pytest.raises(RuntimeError, match="saw no input"):
        cal.finish()
    with pytest.raises(ValueError, match="combine"):
        cal.finish("median")
