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


def test_negative_dominated_inputs_calibrate_to_the_absolute_max():
    """Inputs whose largest magnitude is negative (and whose signed max is small or negative): the range is
    max |x|, not max x.  Oracle: the absmax written into each input by hand."""
    net = _net()
    rows = []
    with Calibrator(net, nfe=3) as cal:
        fn = cal.wrap(lambda x: net(x))
        for absmax, top in ((5.0, 0.25), (2.0, -0.5), (7.5, 3.0)):  # per timestep: |most negative|, max x
            x = -torch.rand(4, 32) * 0.5 * absmax  # all in (-absmax/2, 0]
            x[1, 3], x[2, 30] = -absmax, top
            rows.append(absmax)
            fn(x)
    assert cal.stats["0"] == rows
    cal.finish("max")
    assert net[0].act_scale.item() == pytest.approx(7.5 / 448)
    with Calibrator(net, nfe=1, method="percentile", percentile=100.0) as cal:
        x = torch.full((2, 32), -0.125)
        x[0, 0] = -3.0
        cal.wrap(lambda x: net(x))(x)
    assert cal.stats["0"] == [3.0]


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


def test_recalibration_updates_the_same_scale_tensor():
    # plans and CUDA graphs built earlier read the scale tensor's address: it must never be replaced
    net = _net()
    with Calibrator(net, nfe=1) as cal:
        _run(cal, net, [2.0])
    cal.finish()
    scale = net[0].act_scale
    ptr = scale.data_ptr()
    with Calibrator(net, nfe=1) as cal:
        _run(cal, net, [6.0])
    cal.finish()
    assert net[0].act_scale is scale and scale.data_ptr() == ptr
    assert scale.item() == pytest.approx(6.0 / 448)


def test_failed_calibration_leaves_the_old_scale():
    net = _net()
    net[0].set_act_scale(0.25)
    scale = net[0].act_scale
    with pytest.raises(RuntimeError, match="boom"), Calibrator(net, nfe=1) as cal:
        _run(cal, net, [100.0])
        raise RuntimeError("boom")
    assert net[0].act_scale is scale and scale.item() == 0.25 and net[0].observer is None


def test_two_shapes_of_an_engine_share_one_unmoving_set_of_scales():
    diffusers = pytest.importorskip("diffusers")  # noqa: F841
    import fewstep as fs
    from fewstep.quant import quantized_layers

    from .test_quantize import tiny_dit

    model = tiny_dit()
    fn, spec = fs.models.from_diffusers(model)
    static = {"activation_scales": "static", "calibration_inputs": 1}
    eng = fs.Engine(fn, spec, solver="euler", nfe=2, quant="fp8-emulated", quant_options=static)
    y2, y3 = torch.tensor([3, 7]), torch.tensor([1, 2, 3])
    a = eng(torch.randn(2, 4, 8, 8), class_labels=y2)
    layers = quantized_layers(model)
    before = {n: (m.act_scale, m.act_scale.data_ptr(), m.act_scale.item()) for n, m in layers.items()}
    assert before
    eng(torch.randn(3, 4, 8, 8), class_labels=y3)  # a second shape: a second plan on the same network
    for n, m in quantized_layers(model).items():
        t, ptr, v = before[n]
        assert m.act_scale is t and m.act_scale.data_ptr() == ptr and m.act_scale.item() == v, n
    assert a.shape == (2, 4, 8, 8)
