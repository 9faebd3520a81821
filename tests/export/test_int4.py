"""INT4 plans export as 4-bit initializers (INT4, or UINT4 with zero points) in a blocked DequantizeLinear
(opset 21: axis 0, block_size = the group size) feeding a MatMul; "w4a8" adds the per-token float8 Q/DQ.

Oracles: onnx's own decoder of the 4-bit tensors against the layers' dequantized weights
(``dequantize_int4_ref``), the emulated torch layers and plans against onnxruntime, and the fp32 plan (the
quantization error the file must keep: a file with float weights fails).
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

import fewstep as fs
from fewstep.export import export_network
from fewstep.kernels.int4_gemm import dequantize_int4_ref
from fewstep.quant import INT4Conv1x1, INT4Linear

from .conftest import DIGITS_SHAPE, LABELS, randn, rel_err

NFE = 3
# onnxruntime against the int4-emulated torch plan, whole sample (dpmpp_2m NFE 3, guidance 1.5): measured
# 1.1e-6 .. 1.8e-6 relative over 4 noise seeds (fp32 op order only: the weights dequantize exactly).
SAMPLE_TOL = 2e-5
# one call of the tiny W4A16 network below on onnxruntime's fused MatMulNBits with fp32 compute: measured
# 1.1e-7 (fp32 op order).
LAYER_TOL = 2e-6


def _int4_plan(mode: str, **options):
    from fewstep.models import digits

    dit, _ = digits.load_digits_dit()  # a fresh network: quantization is in place
    model, spec = fs.models.from_diffusers(dit, digits.digits_scheduler_config())
    cond = {"class_labels": LABELS}
    plan = fs.compile(model, spec, solver="dpmpp_2m", nfe=NFE, shape=DIGITS_SHAPE, guidance_scale=1.5,
                      device="cpu", cond=cond, cuda_graph=False, quant=mode,
                      quant_options={"int4_method": "rtn", **options})
    return plan, model, cond


@pytest.fixture(scope="module")
def int4_file(tmp_path_factory):
    plan, model, cond = _int4_plan("int4-emulated")
    path = tmp_path_factory.mktemp("int4") / "plan.onnx"
    return plan, model, cond, path, plan.export_onnx(path, opset=21)


def _layers(model) -> dict[str, INT4Linear]:
    return {n: m for n, m in model.model.named_modules() if isinstance(m, INT4Linear)}


def _dequantized(m, node) -> np.ndarray:
    """What ``node`` (a blocked DequantizeLinear) computes, decoded with onnx's numpy_helper: (K, N)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
    block = next(a.i for a in node.attribute if a.name == "block_size")
    s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32).repeat(block, axis=0)
    z = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).repeat(block, axis=0) \
        if len(node.input) > 2 else 0.0
    return (q - z) * s


def test_weights_stored_as_4bit_in_blocked_dequantize(int4_file, digits, tmp_path):
    import onnx

    plan, model, _, path, report = int4_file
    layers = _layers(model)
    assert report.qdq_layers == len(layers) == 16
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    assert {o.domain: o.version for o in m.opset_import} == {"": 21}
    assert json.loads(m.metadata_props[0].value)["quant"] == "int4-emulated"
    int4 = {i.name: i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    assert len(int4) == len(layers)  # stored once, whatever the NFE
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(layers) * NFE and all(n.input[0] in int4 for n in dq)
    readers = {i: n.op_type for n in m.graph.node for i in n.input}
    for name, layer in layers.items():
        node = next(n for n in dq if n.input[0].endswith(f"{name}.codes"))
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": layer.group_size}
        assert readers[node.output[0]] == "MatMul"
        assert len(int4[node.input[0]].raw_data) == layer.in_features * layer.out_features // 2  # 4 bits
        want = dequantize_int4_ref(layer.packed, layer.scales, layer.zeros).t().numpy()
        np.testing.assert_array_equal(_dequantized(m, node), want)
    # the quantized layers' weights are 4-bit: the file is far smaller than the fp32 plan's
    model32, spec = digits
    fp32 = fs.compile(model32, spec, solver="dpmpp_2m", nfe=NFE, shape=DIGITS_SHAPE, guidance_scale=1.5,
                      device="cpu", cond={"class_labels": LABELS}, cuda_graph=False)
    fp32_bytes = fp32.export_onnx(tmp_path / "fp32.onnx").file_bytes
    saved = sum(3.5 * m.in_features * m.out_features for m in layers.values())  # 4 bytes -> half a byte
    assert report.file_bytes < fp32_bytes - 0.95 * saved, (report.file_bytes, fp32_bytes, saved)


def test_whole_sample_matches_the_int4_emulated_plan(int4_file, digits):
    """One network call per step, the whole sample, on onnxruntime (fs.load_onnx and a bare
    InferenceSession) against the int4-emulated plan; both far from the fp32 plan (the quantization kept)."""
    import onnxruntime as ort

    plan, _, cond, path, _ = int4_file
    model32, spec = digits
    fp32 = fs.compile(model32, spec, solver="dpmpp_2m", nfe=NFE, shape=DIGITS_SHAPE, guidance_scale=1.5,
                      device="cpu", cond=cond, cuda_graph=False)
    noise = randn(*DIGITS_SHAPE, seed=2)
    ref = plan(noise, **cond)
    out = fs.load_onnx(path)(noise, **cond)
    assert rel_err(out, ref) <= SAMPLE_TOL
    assert rel_err(ref, fp32(noise, **cond)) > 100 * SAMPLE_TOL  # the INT4 error the file must reproduce
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    bare = sess.run(["sample"], {"noise": noise.numpy(), "class_labels": LABELS.numpy()})[0]
    assert rel_err(torch.from_numpy(bare), ref) <= SAMPLE_TOL


class _Tiny(nn.Module):
    """``(x: (B, 32, 2, 2), t: (B,)) -> (B, 32, 2, 2)``: INT4 1x1 conv, then two INT4 linears over pixels:
    symmetric group 32; UINT4 zero points, AWQ input scale and GELU; symmetric group 64."""

    def __init__(self, kind: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        kw = dict(kind=kind, backend="emulated")
        conv, lin1, lin2 = nn.Conv2d(32, 64, 1), nn.Linear(64, 128), nn.Linear(128, 32)
        awq = torch.rand(64, generator=g) + 0.5
        self.conv = INT4Conv1x1.from_conv(conv, group_size=32, **kw)
        self.lin1 = INT4Linear.from_linear(lin1, group_size=32, zero_point=True, activation="gelu_tanh",
                                           input_scale=awq, **kw)
        self.lin2 = INT4Linear.from_linear(lin2, group_size=64, **kw)

    def forward(self, x, t):
        h = (self.conv(x) + t.reshape(-1, 1, 1, 1)).permute(0, 2, 3, 1)
        return self.lin2(self.lin1(h)).permute(0, 3, 1, 2)


def _run_tiny(kind, tmp_path):
    """Export, run on onnxruntime, and the torch output.  onnxruntime fuses each blocked DequantizeLinear
    + MatMul whose weight has one reader into MatMulNBits, computing with int8 activations by default
    (``session.qdq_matmulnbits_accuracy_level`` 4; 1: fp32, the W4A16 numbers)."""
    import onnx
    import onnxruntime as ort

    with torch.random.fork_rng():
        torch.manual_seed(0)  # the layers' float weights
        net = _Tiny(kind)
    x, t = randn(3, 32, 2, 2, seed=1), torch.tensor([0.5, -1.0, 2.0])
    export_network(net, tmp_path / "net.onnx", x=x, t=t, cond={}, opset=21)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(tmp_path / "net.onnx"), opts, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"x": x.numpy(), "t": t.numpy()})[0])
    with torch.no_grad():
        ref = net(x, t)
    return net, onnx.load(str(tmp_path / "net.onnx")), out, ref


def test_zero_points_awq_and_conv_one_call(tmp_path):
    """W4A16 layers (1x1 conv, UINT4 zero points, AWQ input scale, GELU) in one network call; onnxruntime runs
    them as its fused int4 MatMulNBits (the layout it expects) with fp32 compute, matching the torch layers
    (at its default int8-activation accuracy level they differ by 1.1e-2 here)."""
    import onnx

    net, m, out, ref = _run_tiny("w4a16", tmp_path)
    assert rel_err(out, ref) <= LAYER_TOL
    fused = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in fused) == 3
    u4, i4 = onnx.TensorProto.UINT4, onnx.TensorProto.INT4
    types = {".".join(i.name.split(".")[-2:]): i.data_type for i in m.graph.initializer
             if i.data_type in (u4, i4)}
    assert types == {"conv.codes": i4, "lin1.codes": u4, "lin1.zeros": u4, "lin2.codes": i4}
    for node in (n for n in m.graph.node if n.op_type == "DequantizeLinear"):
        layer = getattr(net, node.input[0].rsplit(".", 2)[-2])
        want = dequantize_int4_ref(layer.packed, layer.scales, layer.zeros).t().numpy()
        np.testing.assert_array_equal(_dequantized(m, node), want)
    assert sum(n.op_type == "Div" for n in m.graph.node) >= 1  # lin1's AWQ input scale


def test_w4a8_one_call_quantizes_activations_per_token(tmp_path):
    """W4A8 on onnxruntime runs float8 QuantizeLinear (per token, axis 0) before the INT4 DequantizeLinear's
    MatMul; within 1e-2 of the emulated layers (as the FP8 export: an E4M3 rounding may flip)."""
    import onnx

    _, m, out, ref = _run_tiny("w4a8", tmp_path)
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) == 3 and all(next(a.i for a in n.attribute if a.name == "axis") == 0 for n in q)
    f8 = onnx.TensorProto.FLOAT8E4M3FN
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant"}
    assert all(consts[n.input[2]].data_type == f8 for n in q)
    assert rel_err(out, ref) <= 1e-2
    _, _, out16, _ = _run_tiny("w4a16", tmp_path)
    assert rel_err(out16, ref) > 1e-3  # the activation quantization is in the graph, not skipped


def test_w4a8_plan_as_accurate_as_the_emulated_plan(tmp_path, digits):
    """The whole w4a8-emulated sample on onnxruntime: E4M3 rounding flips compound over the calls (see
    test_fp8.py), so against the fp32 plan the file must be about as close as the emulated plan is."""
    import onnx

    plan, _, cond = _int4_plan("w4a8-emulated", zero_point=True)
    path = tmp_path / "w4a8.onnx"
    plan.export_onnx(path, opset=21)
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert sum(i.data_type == onnx.TensorProto.UINT4 for i in m.graph.initializer) == 32  # codes + zeros
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) == 16 * NFE
    model32, spec = digits
    fp32 = fs.compile(model32, spec, solver="dpmpp_2m", nfe=NFE, shape=DIGITS_SHAPE, guidance_scale=1.5,
                      device="cpu", cond=cond, cuda_graph=False)
    noise = randn(*DIGITS_SHAPE, seed=2)
    ref, exact = plan(noise, **cond), fp32(noise, **cond)
    quant_err = rel_err(ref, exact)
    out = fs.load_onnx(path)(noise, **cond)
    assert rel_err(out, exact) <= 1.5 * quant_err, (rel_err(out, exact), quant_err)
    assert rel_err(out, ref) <= 1.5 * quant_err, (rel_err(out, ref), quant_err)


def test_int4_plan_needs_opset_21(int4_file, tmp_path):
    plan = int4_file[0]
    for opset in (19, 20):
        with pytest.raises(ValueError, match=r"INT4 / UINT4 weights .* need opset >= 21"):
            plan.export_onnx(tmp_path / "p.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []
