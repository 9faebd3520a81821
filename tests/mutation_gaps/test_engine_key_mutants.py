"""fs.Engine's plan cache key: the noise's device and each conditioning tensor's device select their own plan,
and conditioning must be tensors (gaps found by `make mutate`).  The meta device stands in for a GPU: a plan
for it cannot be built, so asking for one must try (and fail) instead of returning the CPU plan."""

import pytest
import torch

import fewstep as fs

from ..kernels.programs import VP


def _net(x, t, **cond):
    return torch.tanh(x)


def test_noise_on_another_device_is_another_plan():
    eng = fs.Engine(_net, VP, solver="euler", nfe=2)
    noise = torch.randn(1, 2, 3, 3)
    cpu_plan = eng.plan_for(noise)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got meta"):
        eng.plan_for(noise.to("meta"))
    assert eng.plans == [cpu_plan] and eng.plan_for(noise) is cpu_plan


def test_conditioning_on_another_device_is_another_plan():
    eng = fs.Engine(lambda x, t, class_labels: torch.tanh(x), VP, solver="euler", nfe=2)
    noise, labels = torch.randn(2, 2, 3, 3), torch.tensor([1, 4])
    cpu_plan = eng.plan_for(noise, class_labels=labels)
    with pytest.raises(NotImplementedError, match="meta"):  # the build copies the labels: impossible on meta
        eng.plan_for(noise, class_labels=labels.to("meta"))
    assert eng.plans == [cpu_plan]


def test_conditioning_must_be_tensors():
    eng = fs.Engine(_net, VP, solver="euler", nfe=2)
    with pytest.raises(TypeError, match=r"cond\['class_labels'\] must be a tensor, got list"):
        eng.plan_for(torch.randn(2, 2, 3, 3), class_labels=[1, 2])
    assert eng.plans == []
