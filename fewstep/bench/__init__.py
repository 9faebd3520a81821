"""fewstep.bench: benchmarks of the library (solver step, whole samples, FP8 / INT4 layers), results files.

A tool, not a library layer: it uses the public API like any user and nothing in the library imports it.
``fewstep bench`` (``fewstep/cli/bench.py``) and ``benchmarks/`` run it.

* :mod:`.timing`: the one timing module (``triton.testing.do_bench`` / ``do_bench_cudagraph`` on CUDA, a
  plain timer only for the CPU dry run).
* :mod:`.models`: the networks timed (diffusers classes from published configs, random weights), built once
  per process, on the device.
* :mod:`.sample`, :mod:`.fp8`, :mod:`.int4_speed`: benchmark functions returning frozen result dataclasses,
  and their tables; :mod:`.int4`: INT4 memory and quality (any device).
* :mod:`.results`: results files (GPU name, torch / triton / diffusers versions, git SHA), GPU runs only.
"""

from .models import DIT_TINY, DIT_XL_2, SD15_UNET, random_model
from .results import environment, save_results
from .sample import (
    STEP_CASES,
    STEP_SHAPES,
    SampleResult,
    StepResult,
    bench_sample,
    bench_solver_step,
    format_table,
)
from .timing import copy_bandwidth, graph_median_ms, host_timed, median_ms

__all__ = ["environment", "save_results", "DIT_TINY", "DIT_XL_2", "SD15_UNET", "random_model", "STEP_CASES",
           "STEP_SHAPES", "SampleResult", "StepResult", "bench_sample", "bench_solver_step", "format_table",
           "copy_bandwidth", "graph_median_ms", "host_timed", "median_ms"]
