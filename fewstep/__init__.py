"""fewstep: a low-NFE diffusion inference engine."""

from . import solvers
from .solvers import ModelSpec, schedules

__version__ = "0.1.0"
__all__ = ["solvers", "schedules", "ModelSpec", "__version__"]
