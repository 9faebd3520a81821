"""fewstep.export: a plan as one ONNX graph (the loop unrolled, Q/DQ for FP8 layers), run on onnxruntime or
TensorRT.

    plan.export_onnx("plan.onnx")         # inputs: noise + the cond keywords (+ stage_noise); output: sample
    ort_plan = fs.load_onnx("plan.onnx")  # ort_plan(noise, **cond) -> sample, like the plan
    fewstep.export.build_engine("plan.onnx", "plan.engine"); trt_plan = fs.load_trt("plan.engine")

``onnx`` and ``onnxruntime`` (the ``export`` extra) and ``tensorrt`` are imported only when used.
"""

from .trace import STAGE_NOISE, ExportError

__all__ = ["export_plan", "export_network", "trace_network", "TracedNetwork", "ExportReport", "ExportError",
           "STAGE_NOISE", "load_onnx", "OnnxPlan", "OnnxLoadError", "build_engine", "load_trt", "TrtPlan",
           "DEFAULT_OPSET"]

_LAZY = {
    "export_plan": "onnx_export", "export_network": "onnx_export", "trace_network": "onnx_export",
    "TracedNetwork": "onnx_export", "ExportReport": "onnx_export",
    "DEFAULT_OPSET": "onnx_export", "load_onnx": "runtime", "OnnxPlan": "runtime", "OnnxLoadError": "runtime",
    "build_engine": "trt", "load_trt": "trt", "TrtPlan": "trt",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fewstep.export' has no attribute {name!r}")
