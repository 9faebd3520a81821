"""Hostile inputs to compile / Plan / Engine: shapes, autograd, inference mode, missing conditioning."""

import numpy as np
import pytest
import torch
from torch import nn

import fewstep as fs

from ..kernels.programs import VP, toy_net
from .test_plan import DEV, SHAPE, _noise, as_plan_model

diffusers = pytest.importorskip("diffusers")


def _compile(shape, **kw):
    return fs.compile(as_plan_model(toy_net), VP, solver="euler", nfe=2, shape=shape, device=DEV, **kw)


@pytest.mark.parametrize("shape", [(2, 1, 4, 4), [2, 1, 4, 4], torch.Size([2, 1, 4, 4]),
                                   tuple(np.array([2, 1, 4, 4])), (np.int32(2), 1, np.int64(4), 4)])
def test_shapes_accepted(shape):
    plan = _compile(shape)
    assert plan.shape == (2, 1, 4, 4) and all(type(d) is int for d in plan.shape)


@pytest.mark.parametrize("shape,error,what", [
    ((2.5, 1, 4, 4), TypeError, r"shape\[0\] must be an int, got float 2.5"),
    ((2.0, 1, 4, 4), TypeError, r"shape\[0\] must be an int, got float 2.0"),
    ((2, 1, 4, np.float32(4)), TypeError, r"shape\[3\] must be an int, got float32"),
    ((True, 1, 4, 4), TypeError, r"shape\[0\] must be an int, got bool True"),
    ((2, np.bool_(True), 4, 4), TypeError, r"shape\[1\] must be an int, got bool"),
    ("2,1,4,4", TypeError, "shape must be a sequence of ints.*got str '2,1,4,4'"),
    (b"\x02\x01", TypeError, "shape must be a sequence of ints.*got bytes"),
    (4, TypeError, "shape must be a sequence of ints.*got int 4"),
    ((2, None, 4), TypeError, r"shape\[1\] must be an int, got NoneType"),
    ((), ValueError, "at least one dimension"),
    ((2, 0, 4, 4), ValueError, r"shape\[1\] must be a positive size, got 0"),
    ((-1, 1, 4, 4), ValueError, r"shape\[0\] must be a positive size, got -1"),
])
def test_shapes_refused_naming_the_bad_value(shape, error, what):
    with pytest.raises(error, match=what):
        _compile(shape)


class _GradNet(nn.Module):
    """Parameters that require grad and a float conditioning tensor: everything autograd could record."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x, t, scale):
        return torch.tanh(self.conv(x)) * scale.view(-1, 1, 1, 1) * (t.view(-1, 1, 1, 1) / 1000)


def test_no_autograd_whatever_the_inputs():
    net = _GradNet().to(DEV)
    assert all(p.requires_grad for p in net.parameters())
    scale = torch.tensor([0.5, 1.0, 2.0], device=DEV)
    plan = fs.compile(net, VP, solver="dpmpp_2m", nfe=3, shape=SHAPE, device=DEV, cond={"scale": scale})
    fresh = fs.compile(net, VP, solver="dpmpp_2m", nfe=3, shape=SHAPE, device=DEV, cond={"scale": scale})
    noise = _noise()
    out = plan(noise.clone().requires_grad_(True), scale=scale.clone().requires_grad_(True))
    assert not out.requires_grad and out.grad_fn is None
    assert not plan._state.requires_grad and all(not v.requires_grad for v in plan._cond.values())
    again = plan(noise, scale=scale)
    assert not again.requires_grad
    want = fresh(noise, scale=scale)
    assert torch.equal(out, want) and torch.equal(again, want)
    assert all(p.grad is None for p in net.parameters())
    out.add_(1)  # an ordinary tensor: the caller may change it in place


def test_inference_mode_at_build_or_call():
    want = _compile(SHAPE)(_noise())
    with torch.inference_mode():
        built_inside = _compile(SHAPE)
        inside = built_inside(_noise())
    outside = built_inside(_noise())  # writes into static buffers made under inference_mode
    assert torch.equal(inside, want) and torch.equal(outside, want)
    outside.mul_(2)
    plan = _compile(SHAPE)
    with torch.inference_mode():
        assert torch.equal(plan(_noise()), want)
    assert torch.equal(plan(_noise()), want)


def _tiny_dit():
    from ..models.test_adapters import tiny_dit

    return tiny_dit().to(DEV)


def test_adapter_declares_and_compile_checks_conditioning():
    fn, spec = fs.models.from_diffusers(_tiny_dit())
    assert fn.required_cond == ("class_labels",)
    with pytest.raises(ValueError, match=r"needs the conditioning \['class_labels'\], got \[\]: pass example "
                                         r"tensors as fs.compile\(\.\.\., cond=\{'class_labels': \.\.\.\}\)"):
        fs.compile(fn, spec, solver="euler", nfe=2, shape=(2, 4, 8, 8), device=DEV)
    eng = fs.Engine(fn, spec, solver="euler", nfe=2)
    with pytest.raises(ValueError, match="needs the conditioning"):
        eng(torch.randn(2, 4, 8, 8, device=DEV))
    assert eng.plans == []
    y = torch.tensor([1, 2], device=DEV)
    plan = fs.compile(fn, spec, solver="euler", nfe=2, shape=(2, 4, 8, 8), device=DEV,
                      cond={"class_labels": y})
    assert torch.isfinite(plan(torch.randn(2, 4, 8, 8, device=DEV), class_labels=y)).all()


def test_quantized_compile_checks_conditioning_before_quantizing():
    model = _tiny_dit()
    fn, spec = fs.models.from_diffusers(model)
    with pytest.raises(ValueError, match="needs the conditioning"):
        fs.compile(fn, spec, solver="euler", nfe=2, shape=(2, 4, 8, 8), device=DEV, quant="fp8-emulated")
    assert getattr(model, "_fewstep_quant", None) is None  # nothing half-done: the model is untouched


def _kw_net(x, t, *, y):
    return torch.tanh(x) * y.view(-1, 1, 1, 1)


def _positional_net(x, t, y):
    return torch.tanh(x) * y.view(-1, 1, 1, 1)


@pytest.mark.parametrize("net", [_kw_net, _positional_net])
def test_plain_callable_missing_conditioning_is_explained(net):
    what = r"needs the conditioning keyword\(s\) \['y'\].*cond=\{'y': \.\.\.\}"
    with pytest.raises(TypeError, match=what) as e:
        fs.compile(net, VP, solver="euler", nfe=2, shape=SHAPE, device=DEV)
    assert isinstance(e.value.__cause__, TypeError) and "'y'" in str(e.value.__cause__)


def test_conditioning_the_model_does_not_take_is_explained():
    with pytest.raises(TypeError, match="does not take the conditioning keyword 'y' given in cond="):
        fs.compile(as_plan_model(toy_net), VP, solver="euler", nfe=2, shape=SHAPE, device=DEV,
                   cond={"y": torch.ones(3, device=DEV)})


def test_other_type_errors_pass_through():
    def broken(x, t, y):
        return torch.tanh(x) + "a"

    with pytest.raises(TypeError, match="unsupported operand") as e:
        fs.compile(broken, VP, solver="euler", nfe=2, shape=SHAPE, device=DEV, cond={"y": torch.ones(3)})
    assert e.value.__cause__ is None
