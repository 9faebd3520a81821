"""fewstep: a low-NFE diffusion inference engine."""

from . import solvers
from .solvers import ModelSpec, Tuned, load_tuned, schedules, tune

__version__ = "0.1.0"
__all__ = ["solvers", "schedules", "ModelSpec", "__version__", "compile", "Engine", "Plan", "PlanConfig",
           "load", "PlanFileError", "CaptureError", "models", "quant", "quantize", "QuantConfig",
           "load_onnx", "load_trt", "tune", "Tuned", "load_tuned"]

_ENGINE = ("compile", "Engine", "Plan", "PlanConfig", "load", "PlanFileError", "CaptureError")


def __getattr__(name):
    # The engine imports triton and the models import diffusers; load them on first use so `import fewstep`
    # stays light (and TRITON_INTERPRET may still be set after `import fewstep`).
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    if name in ("models", "quant"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in ("load_onnx", "load_trt"):  # onnx / onnxruntime / tensorrt are imported when called
        from . import export

        return getattr(export, name)
    if name in ("quantize", "QuantConfig"):
        from . import quant

        return getattr(quant, name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
