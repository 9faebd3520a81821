"""nfe has an upper bound, checked before anything is built: NFE_MAX = 1000 network calls, or fewer where a
grid of integer timesteps runs out of distinct ones.  At the bound every solver builds; one more is a
ValueError naming the bound, never a ZeroDivisionError or minutes of building."""

import math
import time

import numpy as np
import pytest

import fewstep as fs
from fewstep.solvers import Spacing
from fewstep.solvers.schedules import Point
from fewstep.solvers.spacing import valid_spacings

VP = fs.ModelSpec(fs.schedules.DiscreteVP())  # 1000 training timesteps
SPECS = {
    "vp": VP,
    "edm": fs.ModelSpec(fs.schedules.EDM(), "sample"),
    "flow": fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow"),
}
MULTISTEP = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s", "unipc", "deis", "ipndm")


def expected_max(name: str, kind: str, spacing: str, final: str) -> int:
    """The largest nfe, worked out by hand for a 1000-step VP schedule (and continuous EDM / flow ones)."""
    if kind == "vp":
        if name in ("lcm", "tcd"):
            return 50  # original_inference_steps
        if name in MULTISTEP and spacing in ("linspace", "leading"):
            return 999  # n + 1 integer timesteps spaced over 0..999, t = 0 dropped
        if name in ("deis", "ipndm") and spacing == "trailing" and final == "sigma_min":
            return 999  # trailing reaches t = 0 = the end; DEIS spaces one more point instead
    if name in ("heun", "flow_heun"):
        return 999 if final == "zero" else 1000  # 2 calls per step, 1 for a final Euler step: odd
    return 1000  # NFE_MAX


def _applies(name, spec, spacing, opts) -> bool:
    """Whether the solver takes this spec / spacing at all (at a small nfe)."""
    for nfe in (3, 4):
        try:
            fs.solvers.build(name, spec, nfe, spacing, **opts)
            return True
        except ValueError as e:
            if "nfe must be" not in str(e):
                return False
    return False


def _cases():
    for name in fs.solvers.available():
        for kind, spec in SPECS.items():
            for spacing in valid_spacings(spec):
                if spacing in ("timesteps", "sigmas"):
                    continue
                finals = [None]  # the solver's default, plus the final sigma where it moves the bound:
                if name in ("deis", "ipndm") and spacing == "trailing" and kind == "vp":
                    finals = ["zero", "sigma_min"]
                if name == "heun" and spacing == valid_spacings(spec)[0]:
                    finals = ["zero", "sigma_min"]
                for final in finals:
                    opts = {} if final is None else {"final": final}
                    if name == "tcd":
                        opts = {"final": "sigma_min"}
                    yield pytest.param(name, kind, spacing, opts, id=f"{name}-{kind}-{spacing}-{final or ''}")


@pytest.mark.parametrize("name,kind,spacing,opts", list(_cases()))
def test_largest_nfe_builds_and_one_more_is_a_clear_error(name, kind, spacing, opts):
    spec = SPECS[kind]
    if not _applies(name, spec, spacing, opts):
        pytest.skip(f"{name} does not run on {kind} with {spacing} spacing")
    final = opts.get("final", fs.solvers.get(name).options().final)
    top = expected_max(name, kind, spacing, final)
    assert fs.solvers.max_nfe(name, spec, spacing, **opts) == top
    prog = fs.solvers.build(name, spec, top, spacing, **opts)
    assert prog.nfe == top
    assert all(np.isfinite(st.matrix).all() for st in prog.stages)
    lams = [c.point.lam for c in prog.calls]
    if name in ("heun", "flow_heun"):  # the corrector's call and the next step's share a point
        assert all(a <= b for a, b in zip(lams, lams[1:])) and len(set(lams)) >= top // 2
    else:
        assert all(a < b for a, b in zip(lams, lams[1:])), "two calls at the same noise level"
    for nfe in (top + 1, 10**6):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=rf"nfe={nfe} is too large .*the largest valid nfe is {top} "):
            fs.solvers.build(name, spec, nfe, spacing, **opts)
        assert time.perf_counter() - t0 < 5.0  # generous: the check builds nothing (it takes milliseconds)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "deis", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_2s"])
def test_nfe_1000_on_linspace_vp_was_a_zero_division(name):
    """The issue's case: 1000 linspace steps repeat integer timesteps (a zero-length step)."""
    with pytest.raises(ValueError, match="largest valid nfe is 999 .*linspace spacing gives distinct "
                                         r"timesteps in \[0, 999\] for at most 999 steps"):
        fs.solvers.build(name, VP, 1000, "linspace")


# diffusers' own set_timesteps is the oracle for how many distinct timesteps an integer spacing has: on a
# small schedule, try every n and keep the largest that gives n distinct timesteps in [0, T - 1]
T_SMALL = 40


def _diffusers_largest(cls_name: str, spacing: str, offset: int, **kw) -> int:
    diffusers = pytest.importorskip("diffusers")
    best = 0
    for n in range(1, T_SMALL + 3):
        sch = getattr(diffusers, cls_name)(num_train_timesteps=T_SMALL, timestep_spacing=spacing,
                                          steps_offset=offset, **kw)
        try:
            sch.set_timesteps(n)
        except ValueError:
            continue
        ts = sch.timesteps.double().numpy()
        ok = len(ts) == n and len(set(ts.tolist())) == n and ts.min() >= 0 and ts.max() <= T_SMALL - 1
        if ok:
            best = n
    return best


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("offset", [0, 1, 7])
@pytest.mark.parametrize("solver,cls_name", [
    ("dpmpp_2m", "DPMSolverMultistepScheduler"),
    ("unipc", "UniPCMultistepScheduler"),
    ("euler", "EulerDiscreteScheduler"),
    ("ddim", "DDIMScheduler"),
])
def test_largest_nfe_is_where_diffusers_runs_out_of_distinct_timesteps(solver, cls_name, spacing, offset):
    if offset and spacing != "leading":
        pytest.skip("steps_offset moves only leading timesteps in fewstep")
    spec = fs.ModelSpec(fs.schedules.DiscreteVP(num_train_timesteps=T_SMALL))
    sp = Spacing(spacing, steps_offset=offset)
    kw = {"clip_sample": False} if cls_name == "DDIMScheduler" else {}
    if solver == "euler" and spacing == "linspace":
        # fractional timesteps never repeat: only NFE_MAX bounds it
        assert fs.solvers.max_nfe(solver, spec, sp) == fs.solvers.NFE_MAX
        return
    top = _diffusers_largest(cls_name, spacing, offset, **kw)
    assert 0 < top < T_SMALL + 2
    assert fs.solvers.max_nfe(solver, spec, sp) == top
    assert fs.solvers.build(solver, spec, top, sp).nfe == top
    with pytest.raises(ValueError, match=f"largest valid nfe is {top} "):
        fs.solvers.build(solver, spec, top + 1, sp)


def test_explicit_lists_allow_exactly_their_length():
    ts = [999, 700, 400, 100]
    assert fs.solvers.build("dpmpp_2m", VP, 4, ts).nfe == 4
    with pytest.raises(ValueError, match="largest valid nfe is 4 .the explicit list has 4 timesteps"):
        fs.solvers.build("dpmpp_2m", VP, 5, ts)
    sig = Spacing("sigmas", values=(80.0, 10.0, 1.0, 0.0))
    edm = SPECS["edm"]
    assert fs.solvers.build("euler", edm, 3, sig).nfe == 3
    with pytest.raises(ValueError, match="largest valid nfe is 3 .the explicit list has 4 sigmas"):
        fs.solvers.build("euler", edm, 4, sig)


def test_a_zero_length_step_is_refused_before_any_solver_sees_it():
    pts = [Point(1 / math.sqrt(2), 1 / math.sqrt(2), 500.0), Point(0.9, math.sqrt(0.19), 100.0)]
    end = Point(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="does not move past point 0"):
        fs.solvers.Grid((pts[0], pts[0], pts[1], end))
    with pytest.raises(ValueError, match="noisier than its last point"):
        fs.solvers.Grid((pts[1], pts[0]))
    # the last step may have zero length (karras + final='sigma_min', as diffusers): an exact identity step
    assert fs.solvers.Grid((pts[0], pts[1], pts[1])).n == 2
