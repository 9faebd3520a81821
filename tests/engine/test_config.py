"""PlanConfig: one frozen, validated object for a plan's options; the keyword form builds the same plan."""

import dataclasses

import pytest
import torch

import fewstep as fs
from fewstep.kernels.solver_update import KernelConfig, pick_config

from ..kernels.programs import VP, toy_net
from .test_plan import DEV, SHAPE, _noise, as_plan_model


@pytest.mark.parametrize("kw,what", [
    ({"dtype": torch.int32}, "PlanConfig.dtype must be a floating-point torch.dtype, got torch.int32"),
    ({"dtype": "bfloat16"}, "PlanConfig.dtype must be a floating-point torch.dtype"),
    ({"cuda_graph": 1}, "PlanConfig.cuda_graph must be True or False, got 1"),
    ({"check_finite": None}, "PlanConfig.check_finite must be True or False"),
    ({"record_noise": "yes"}, "PlanConfig.record_noise must be True or False"),
    ({"compile_network": "reduce-overhead"}, "PlanConfig.compile_network must be one of"),
    ({"compile_network": 1}, "PlanConfig.compile_network must be one of"),
    ({"kernels": "opencl"},
     r"PlanConfig.kernels must be one of \('auto', 'triton', 'cuda', 'cpp', 'torch'\), got 'opencl'"),
    ({"kernel_config": (1024, 4)}, "PlanConfig.kernel_config must be a KernelConfig"),
])
def test_invalid_fields_are_named(kw, what):
    with pytest.raises(ValueError, match=what):
        fs.PlanConfig(**kw)


def test_frozen_and_json_round_trip():
    cfg = fs.PlanConfig(dtype=torch.bfloat16, check_finite=True, compile_network="max-autotune-no-cudagraphs",
                        kernels="torch", kernel_config=KernelConfig(2048, 8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dtype = torch.float32
    assert fs.PlanConfig.from_json(cfg.to_json()) == cfg
    assert fs.PlanConfig.from_json(fs.PlanConfig().to_json()) == fs.PlanConfig()


def test_config_object_and_keywords_build_the_same_plan():
    model = as_plan_model(toy_net)
    a = fs.compile(model, VP, solver="euler", nfe=3, shape=SHAPE, device=DEV, check_finite=True,
                   kernels="torch")
    b = fs.compile(model, VP, solver="euler", nfe=3, shape=SHAPE, device=DEV,
                   config=fs.PlanConfig(check_finite=True, kernels="torch"))
    assert a.config == b.config and a.check_finite and b.check_finite
    assert torch.equal(a(_noise()), b(_noise()))
    # the plan's config is the request with what the build resolved: the dtype and the launch
    assert b.config == fs.PlanConfig(dtype=torch.float32, check_finite=True, kernels="torch",
                                     kernel_config=pick_config(b._state.shape[1]))
    with pytest.raises(ValueError, match=r"either as config=PlanConfig\(...\) or as keywords, not both "
                                         r"\(got config= and \['dtype'\]\)"):
        fs.compile(model, VP, solver="euler", nfe=3, shape=SHAPE, device=DEV, config=fs.PlanConfig(),
                   dtype=torch.float32)
    with pytest.raises(TypeError, match="config must be a fewstep.PlanConfig, got dict"):
        fs.compile(model, VP, solver="euler", nfe=3, shape=SHAPE, device=DEV, config={"dtype": torch.float32})


def test_engine_takes_the_same_config():
    model = as_plan_model(toy_net)
    eng = fs.Engine(model, VP, solver="euler", nfe=2, config=fs.PlanConfig(check_finite=True))
    eng(_noise((2, 2, 3, 3)))
    assert eng.plans[0].check_finite and eng.config.check_finite
    kw = fs.Engine(model, VP, solver="euler", nfe=2, check_finite=True)
    assert kw.config == eng.config
    with pytest.raises(ValueError, match="not both"):
        fs.Engine(model, VP, solver="euler", nfe=2, config=fs.PlanConfig(), check_finite=True)
