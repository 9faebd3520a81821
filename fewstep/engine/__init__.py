"""fewstep.engine: model + solver -> a static Plan (one CUDA graph per sample); Engine: a plan per shape."""

from .api import compile, load
from .config import PlanConfig
from .engine import Engine
from .plan import CaptureError, Plan
from .planfile import PlanFileError

__all__ = ["Engine", "Plan", "PlanConfig", "PlanFileError", "CaptureError", "compile", "load"]
