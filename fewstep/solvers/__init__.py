"""Pure float64 solver math: schedules, grids, solvers -> StepProgram, and an eager reference executor."""

# the solver modules, each imported once by name: their @register decorators fill the registry
from . import (  # noqa: F401
    algo_consistency,
    algo_ddim,
    algo_deis,
    algo_dpm,
    algo_euler,
    algo_heun,
    algo_ipndm,
    algo_unipc,
    schedules,
)
from .build import build, max_nfe
from .diffusers_map import to_diffusers
from .grids import NFE_MAX
from .program import Lin, ProgramBuilder, Stage, StepProgram
from .reference import run_reference
from .registry import BuildContext, CommonOptions, available, get, register
from .serialize import program_from_dict, program_to_dict
from .spacing import SPACINGS, Grid, Spacing, make_grid
from .spec import ModelSpec
from .tuning import Tuned, TunedFileError, load_tuned, tune

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
    "max_nfe",
    "NFE_MAX",
    "get",
    "register",
    "SPACINGS",
    "Grid",
    "Spacing",
    "make_grid",
    "ModelSpec",
    "tune",
    "Tuned",
    "TunedFileError",
    "load_tuned",
]
