"""Pure float64 solver math: schedules, grids, solvers -> StepProgram, and an eager reference executor."""

from . import schedules
from .program import Lin, ProgramBuilder, Stage, StepProgram
from .reference import run_reference
from .registry import BuildContext, CommonOptions, available, build, get, register, to_diffusers
from .serialize import program_from_dict, program_to_dict
from .spacing import SPACINGS, Grid, Spacing, make_grid
from .spec import ModelSpec

__all__ = [
    "schedules",
    "Lin",
    "ProgramBuilder",
    "Stage",
    "StepProgram",
    "run_reference",
    "program_to_dict",
    "program_from_dict",
    "BuildContext",
    "CommonOptions",
    "to_diffusers",
    "available",
    "build",
    "get",
    "register",
    "SPACINGS",
    "Grid",
    "Spacing",
    "make_grid",
    "ModelSpec",
]
