"""fewstep.bench: benchmarks of the library (solver step, whole samples, FP8 layers) and their results files.

A tool, not a library layer: it uses the public API like any user and nothing in the library imports it.
``fewstep bench`` (``fewstep/cli/bench.py``) and ``benchmarks/`` run it.
"""

from .results import environment, save_results
from .sample import (
    DIT_TINY,
    DIT_XL_2,
    STEP_CASES,
    STEP_SHAPES,
    SampleResult,
    StepResult,
    bench_sample,
    bench_solver_step,
    format_table,
)
from .timing import copy_bandwidth, timer

__all__ = ["environment", "save_results", "DIT_TINY", "DIT_XL_2", "STEP_CASES", "STEP_SHAPES", "SampleResult",
           "StepResult", "bench_sample", "bench_solver_step", "format_table", "copy_bandwidth", "timer"]
