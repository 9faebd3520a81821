"""fewstep.engine: model + solver -> a static Plan (one CUDA graph per sample); Engine: a plan per shape."""

from .engine import Engine
from .plan import CaptureError, Plan, compile, load

__all__ = ["Engine", "Plan", "CaptureError", "compile", "load"]
