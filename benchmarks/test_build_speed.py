"""Building a StepProgram must be cheap: under 50 ms for nfe <= 50 (host-only, float64)."""

import pytest
import torch

import fewstep as fs
from fewstep.bench.timing import median_ms

SPEC = fs.ModelSpec(fs.schedules.DiscreteVP())
BUDGET_MS = 50.0


def _cases():
    for name in fs.solvers.available():
        nfe = 49 if name in ("heun", "flow_heun") else 50  # heun makes odd NFEs (final Euler step)
        yield pytest.param(name, nfe, id=f"{name}-nfe{nfe}")


@pytest.mark.parametrize("name,nfe", list(_cases()))
def test_build_time(benchmark, name, nfe):
    spec = SPEC
    if name.startswith("flow_"):
        spec = fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow")
    try:
        fs.solvers.build(name, spec, nfe)
    except ValueError as e:  # a solver that cannot make this NFE says so at build time
        pytest.skip(str(e))
    prog = benchmark(fs.solvers.build, name, spec, nfe)
    assert prog.nfe == nfe
    # the budget check itself: a median of host timings, independent of the benchmark plugin's mode
    ms = median_ms(lambda: fs.solvers.build(name, spec, nfe), torch.device("cpu"))
    assert ms < BUDGET_MS, f"{name} nfe={nfe}: median build {ms:.1f} ms > {BUDGET_MS:.0f} ms"
