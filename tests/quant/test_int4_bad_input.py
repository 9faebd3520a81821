"""fs.quantize with an INT4 mode on layers it cannot take (K not a multiple of the group size, N or K not a
multiple of 16, a skip rule): they stay as they were with the reason logged; an INT4 mode the GPU cannot run
is a clear error before anything is changed."""

import logging
import types

import pytest
import torch
from torch import nn

import fewstep as fs
from fewstep.quant import INT4Linear, quantized_layers

from ..kernels.fp8_util import sqnr_db


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128),  # 0: INT4
        nn.Linear(128, 24),  # 1: N = 24 is not a multiple of 16
        nn.Linear(24, 96),  # 2: K = 24 is not a multiple of the group size 32 (nor of 16)
        nn.Linear(96, 64),  # 3: INT4
        nn.Linear(64, 64),  # 4: a user skip rule
    ).eval().requires_grad_(False)


@pytest.mark.parametrize("mode", ["int4-emulated", "w4a8-emulated"])
def test_layers_int4_cannot_take_stay_with_the_reason_logged(mode, caplog):
    net, ref = _net(), _net()
    with caplog.at_level(logging.INFO, logger="fewstep.quant"):
        report = fs.quantize(net, mode, group_size=32, extra_skip=("4",))
    assert report.quantized == ["0", "3"]
    assert dict(report.skipped) == {
        "1": "K=128 or N=24 is not a multiple of 16",
        "2": "K=24 is not a multiple of the INT4 group size 32",
        "4": "user skip rule",
    }
    for name, reason in report.skipped:
        assert f"{name} stays unquantized: {reason}" in caplog.text
    assert set(quantized_layers(net)) == {"0", "3"} and isinstance(net[0], INT4Linear)
    for i in (1, 2, 4):  # kept layers are the same modules with the same weights
        assert type(net[i]) is nn.Linear
        torch.testing.assert_close(net[i].weight, ref[i].weight, rtol=0, atol=0)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = ref.double()(x.double())
        assert sqnr_db(net(x), want) >= 15.0  # two INT4 layers of four in series; NaN fails


def test_group_size_larger_than_every_k_keeps_everything_with_a_warning(caplog):
    net = _net()
    with caplog.at_level(logging.INFO, logger="fewstep.quant"):
        with pytest.warns(UserWarning, match="no quantizable"):
            report = fs.quantize(net, "int4-emulated", group_size=256)
    assert report.quantized == [] and not quantized_layers(net)
    assert "K=64 is not a multiple of the INT4 group size 256" in caplog.text


def _on_fake_gpu(net, monkeypatch, name: str, capability: tuple[int, int], fp8: bool):
    """Make ``net`` look as if it lived on ``cuda:0`` of the given kind (the checks read only the device of
    the first parameter, the device's name and capability, and whether it has FP8 tensor cores)."""
    import fewstep.quant.quantize_model as qmod

    fake = types.SimpleNamespace(device=torch.device("cuda", 0))
    net.parameters = lambda recurse=True: iter([fake])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(qmod, "has_fp8_tensor_cores", lambda d: fp8)


@pytest.mark.parametrize(
    "mode,gpu,capability,fp8,want",
    [
        ("w4a8", "NVIDIA A100", (8, 0), False, r"quant='w4a8' needs FP8 tensor cores .*NVIDIA A100 has 8\.0"),
        ("w4a8", "Tesla T4", (7, 5), False, r"Tesla T4 has 7\.5.*quant='int4'.*quant='w4a8-emulated'"),
        ("int4", "Tesla T4", (7, 5), False, r"quant='int4' needs bf16 tensor cores .*T4.*int4-emulated"),
    ],
)
def test_int4_mode_the_gpu_cannot_run_is_a_clear_error_that_changes_nothing(
    mode, gpu, capability, fp8, want, monkeypatch
):
    net = _net()
    _on_fake_gpu(net, monkeypatch, gpu, capability, fp8)
    with pytest.raises(RuntimeError, match=want):
        fs.quantize(net, mode, group_size=32)
    del net.parameters
    assert all(type(m) is nn.Linear for m in net) and getattr(net, "_fewstep_quant", None) is None
