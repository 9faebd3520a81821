"""CUDA-graph plans (GPU only; skipped on CPU CI): capture, replay without syncs or allocation, seeds,
capture errors, shared pools."""

import pytest
import torch

import fewstep as fs
from fewstep.engine import CaptureError, Plan

from ..kernels.programs import VP, get_program, guided_toy_net, program_ids, toy_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SHAPE = (3, 4, 16, 16)


def _net(fn):
    def model(x, t):
        s = t.view(-1, *([1] * (x.dim() - 1))) / 1000
        return fn(x, 0.0) + 0.1 * s * x  # fully on the device: no host float of t
    return model


def _rel(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("name", program_ids())
def test_graph_plan_matches_eager_and_reference(name, guidance):
    prog = get_program(name, guidance)
    net = _net(guided_toy_net if guidance is not None else toy_net)
    graph = Plan(net, prog, shape=SHAPE, device="cuda", record_noise=True)
    eager = Plan(net, prog, shape=SHAPE, device="cuda", cuda_graph=False, record_noise=True)
    assert graph.cuda_graph and not eager.cuda_graph
    noise = torch.randn(SHAPE, device="cuda")
    a = graph(noise, seed=3)
    b = eager(noise, seed=3)
    assert torch.equal(a, b)  # same kernels, same seed: bit for bit

    def ref_net(x, t):
        return net(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))

    ref = fs.solvers.run_reference(prog, ref_net, noise.double(), step_noise=graph.recorded_noise())
    assert _rel(a, ref) <= 1e-4


def test_replay_has_no_sync_and_no_allocation():
    plan = Plan(_net(toy_net), get_program("local_ancestral"), shape=SHAPE, device="cuda")
    noise = torch.randn(SHAPE, device="cuda")
    out = plan(noise, seed=1, copy=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out2 = plan(noise, seed=1, copy=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert out2.data_ptr() == out.data_ptr()
    c = plan(noise, seed=2)
    assert not torch.equal(c, plan(noise, seed=1))


def test_syncing_model_is_reported_and_nothing_is_left_captured():
    def syncing(x, t):
        if x.abs().max().item() > 1e9:
            return x
        return torch.tanh(x)

    with pytest.raises(CaptureError, match="synchroniz"):
        fs.compile(syncing, VP, solver="euler", nfe=2, shape=SHAPE, device="cuda")

    def h2d(x, t):
        return torch.tanh(x) * torch.tensor([0.5]).to(x.device)

    with pytest.raises(CaptureError):
        fs.compile(h2d, VP, solver="euler", nfe=2, shape=SHAPE, device="cuda")
    assert not torch.cuda.is_current_stream_capturing()
    ok = fs.compile(_net(toy_net), VP, solver="euler", nfe=2, shape=SHAPE, device="cuda")  # next build works
    assert torch.isfinite(ok(torch.randn(SHAPE, device="cuda"))).all()
    eager = fs.compile(syncing, VP, solver="euler", nfe=2, shape=SHAPE, device="cuda", cuda_graph=False)
    assert torch.isfinite(eager(torch.randn(SHAPE, device="cuda"))).all()


def test_engine_plans_share_a_pool_and_stay_correct():
    eng = fs.Engine(_net(toy_net), VP, solver="dpmpp_2m" if "dpmpp_2m" in fs.solvers.available() else "euler",
                    nfe=4, max_plans=3)
    xs = [torch.randn((b, 4, 8, 8), device="cuda") for b in (1, 2, 5)]
    first = [eng(x) for x in xs]
    again = [eng(x) for x in reversed(xs)][::-1]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert len(eng.plans) == 3


def test_wrong_device_is_a_value_error():
    plan = fs.compile(_net(toy_net), VP, solver="euler", nfe=2, shape=SHAPE, device="cuda")
    with pytest.raises(ValueError, match="noise device: expected cuda:0, got cpu"):
        plan(torch.randn(SHAPE))


def test_bf16_graph_plan():
    net = _net(toy_net)

    def bf16(x, t):
        return net(x.float(), t).to(torch.bfloat16)

    prog = get_program("local_ab2")
    plan = Plan(bf16, prog, shape=SHAPE, device="cuda", dtype=torch.bfloat16)
    noise = torch.randn(SHAPE, device="cuda")

    def ref_net(x, t):
        return net(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))

    exact = fs.solvers.run_reference(prog, ref_net, noise.double())
    naive = fs.solvers.run_reference(prog, lambda x, t: ref_net(x, t).bfloat16(), noise, dtype=torch.bfloat16)
    assert _rel(plan(noise), exact) <= 2 * _rel(naive, exact)


def test_fp8_static_scales_never_move_under_captured_plans():
    # two shapes of an Engine on one FP8 network with static scales: the second plan's build must neither
    # replace nor change the scale tensors the first plan's CUDA graph reads
    pytest.importorskip("diffusers")
    from fewstep.kernels.fp8_gemm import has_fp8_tensor_cores
    from fewstep.quant import quantized_layers

    from ..quant.test_quantize import tiny_dit

    model = tiny_dit().cuda()
    fn, spec = fs.models.from_diffusers(model)
    mode = "fp8" if has_fp8_tensor_cores("cuda") else "fp8-emulated"
    eng = fs.Engine(fn, spec, solver="euler", nfe=2, quant=mode,
                    quant_options={"activation_scales": "static", "calibration_inputs": 1})
    y2 = torch.tensor([3, 7], device="cuda")
    noise = torch.randn(2, 4, 8, 8, device="cuda")
    first = eng(noise, seed=1, class_labels=y2)
    scales = {n: (m.act_scale, m.act_scale.data_ptr(), m.act_scale.clone())
              for n, m in quantized_layers(model).items()}
    assert scales
    eng(torch.randn(3, 4, 8, 8, device="cuda"), seed=1, class_labels=torch.tensor([1, 2, 3], device="cuda"))
    for n, m in quantized_layers(model).items():
        t, ptr, value = scales[n]
        assert m.act_scale is t and t.data_ptr() == ptr and torch.equal(t, value), n
    assert torch.equal(eng(noise, seed=1, class_labels=y2), first)  # the first graph replays the same
