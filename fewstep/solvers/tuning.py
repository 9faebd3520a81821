"""``fs.tune``: fit a solver's grid (and optionally its coefficients) to the user's own model.

A tuned solver is just another :class:`~fewstep.solvers.program.StepProgram`: the call points move and, with
``method="coefficients"``, each stage's weights on the network output are rescaled.  Every stage stays a
linear map over the same registers, so plans, kernels, graphs and plan files need nothing new.

Methods:

* ``"timesteps"`` -- a teacher trajectory per calibration sample (a second-order multistep solver at high
  NFE), a GITS-style dynamic programme over the teacher's call points (Chen et al. 2024, "On the Trajectory
  Regularity of ODE-based Diffusion Sampling": the cost of a step is the distance between a first-order step
  from the teacher's state and the teacher's own state at the step's end), then coordinate descent on the
  log-sigmas of the grid against the teacher's endpoints, within a bounded number of network calls.
* ``"coefficients"`` -- the grid as above, then one multiplier per stage on the network-output columns,
  regularised toward 1 (the per-stage scaling of bespoke / S4S-style solvers, kept linear).
* ``"dmn"`` -- model-free: the same search, run on a Gaussian data model whose denoiser is exact (variance
  ``sigma_data**2``, 0.5 as in EDM), so only the schedule and the solver matter.  This is in the spirit of
  Xue et al. 2024 ("Accelerating Diffusion Sampling with Optimized Time Steps", CVPR), who choose the steps
  from the schedule alone by minimising a model-agnostic discretization error; our objective is the exact
  error on that Gaussian, not their bound.
* ``"auto"`` -- "dmn" when ``budget == 0``, "coefficients" with the default budget or more, else
  "timesteps".

Generalization guard: the last ``holdout`` samples of ``noise`` never enter the fit.  The tuned program is
returned only if its error against the teacher on them is lower than the untuned program's; otherwise the
untuned program comes back with ``improved == False``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .build import build
from .gmm import GaussianMixture, end_point
from .program import StepProgram
from .reference import run_reference
from .schedules import EDM, DiscreteVP, Flow
from .serialize import program_from_dict, program_to_dict
from .spacing import Spacing, valid_spacings
from .spec import ModelSpec

__all__ = ["tune", "Tuned", "TunedFileError", "load_tuned", "METHODS", "DEFAULT_BUDGET"]

METHODS = ("auto", "timesteps", "coefficients", "dmn")
FORMAT, VERSION = "fewstep.tuned", 1
DEFAULT_BUDGET = 600  # network calls (each on the whole calibration batch) for the search after the teacher
TEACHER_SOLVER, TEACHER_NFE = "dpmpp_2m", 100
_DMN_DIM = 16  # dimensions of the Gaussian data model of method="dmn"
_N_STARTS = 3  # starting grids refined before the best of them continues
_MIN_SPLIT = 2  # samples on each side of the calibration / held-out split


@dataclass(frozen=True)
class Tuned:
    """A tuned solver: ``program`` runs anywhere a StepProgram does; pass the object as ``solver=`` to
    ``fs.compile`` / ``fs.Engine``.  ``report`` holds the held-out error before and after tuning."""

    program: StepProgram
    solver: str
    nfe: int
    method: str
    improved: bool
    report: Mapping[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> ModelSpec:
        return self.program.spec

    def summary(self) -> str:
        r = self.report
        verdict = ("tuned program kept" if self.improved
                   else "no held-out gain: the untuned program is returned")
        return (f"{self.solver} nfe={self.nfe} method={self.method}: held-out error "
                f"{r.get('holdout_before', float('nan')):.4g} -> {r.get('holdout_after', float('nan')):.4g} "
                f"({verdict}); {r.get('network_calls', 0)} network calls, {r.get('seconds', 0.0):.1f} s")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "solver": self.solver, "nfe": self.nfe,
                "method": self.method, "improved": self.improved, "report": _jsonable(self.report),
                "program": program_to_dict(self.program)}

    def save(self, path) -> None:
        """Write the tuned solver as a JSON document (through a temporary file: never half-written)."""
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def check_fits(self, spec: ModelSpec | None = None, nfe: int | None = None,
                   guidance_scale: float | None | str = "any", where: str = "tuned solver") -> None:
        """Raise ValueError if this tuned program was made for another spec, nfe or guidance scale."""
        if spec is not None and spec != self.program.spec:
            raise ValueError(f"{where} was tuned for {_spec_text(self.program.spec, spec)}")
        if nfe is not None and nfe != self.nfe:
            raise ValueError(f"{where} has nfe={self.nfe}, got nfe={nfe}")
        if guidance_scale != "any" and guidance_scale != self.program.guidance_scale:
            raise ValueError(f"{where} was tuned with guidance_scale={self.program.guidance_scale}, got "
                             f"{guidance_scale}")


class TunedFileError(ValueError):
    """A tuned-solver file that cannot be loaded: ``"<path>: <what is wrong>"``."""

    def __init__(self, path, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path, self.reason = os.fspath(path), reason


def load_tuned(path, *, spec: ModelSpec | None = None, solver: str | None = None) -> Tuned:
    """Read a file written by :meth:`Tuned.save` (parsed as JSON, never unpickled); with ``spec`` /
    ``solver`` given, a file tuned for another one is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise TunedFileError(path, f"cannot read the file ({e.strerror or e})") from e
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TunedFileError(path, "not a fewstep tuned-solver file (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise TunedFileError(path, f"not a fewstep tuned-solver file (format {got!r}, expected {FORMAT!r})")
    if doc.get("version") != VERSION or isinstance(doc.get("version"), bool):
        raise TunedFileError(path, f"format version {doc.get('version')!r} unsupported (this fewstep reads "
                                   f"{VERSION})")
    kinds = {"solver": str, "nfe": int, "method": str, "improved": bool, "report": dict, "program": dict}
    for key, kind in kinds.items():
        if key not in doc:
            raise TunedFileError(path, f"field {key!r} missing")
        if not isinstance(doc[key], kind) or (kind is int and isinstance(doc[key], bool)):
            raise TunedFileError(path, f"field {key!r}: expected {kind.__name__}, got "
                                       f"{type(doc[key]).__name__}")
    if doc["method"] not in METHODS[1:]:
        raise TunedFileError(path, f"field 'method': expected one of {METHODS[1:]}, got {doc['method']!r}")
    try:
        prog = program_from_dict(doc["program"], where="program")
    except ValueError as e:
        raise TunedFileError(path, str(e)) from None
    if prog.nfe != doc["nfe"] or prog.solver != doc["solver"]:
        raise TunedFileError(path, f"field 'program': a {prog.solver} program with nfe={prog.nfe}, but the "
                                   f"file says {doc['solver']} nfe={doc['nfe']}")
    t = Tuned(prog, doc["solver"], doc["nfe"], doc["method"], doc["improved"], doc["report"])
    if solver is not None and solver != t.solver:
        raise TunedFileError(path, f"tuned for solver {t.solver!r}, not {solver!r}")
    if spec is not None and spec != prog.spec:
        raise TunedFileError(path, f"tuned for {_spec_text(prog.spec, spec)}")
    return t


# -- the entry point ----------------------------------------------------------------------------------------
def tune(model: Callable[..., torch.Tensor], spec: ModelSpec, *, solver: str, nfe: int, noise: torch.Tensor,
         cond: Mapping[str, torch.Tensor] | None = None, guidance_scale: float | None = None,
         method: str = "auto", budget: int | None = None, holdout: int | float = 0.25,
         spacing: Any = None, teacher_nfe: int = TEACHER_NFE, reg: float = 1.0, verbose: bool = True,
         **solver_options: Any) -> Tuned:
    """Tune solver ``solver`` at ``nfe`` calls for ``model`` (``model(x, t, **cond)``, ``t`` a float32 tensor
    of shape ``(batch,)``; with guidance ``x`` has twice the batch and the model builds ``[uncond; cond]``
    from ``cond``, exactly as ``fs.compile`` calls it).

    noise: (batch, ...) standard-normal starts; the last ``holdout`` of them (an int, or a fraction of the
    batch) are held out.  cond: conditioning tensors; those whose first dimension is the noise batch are split
    with it.  budget: network calls for the search after the teacher (None: ``DEFAULT_BUDGET``; 0 with
    ``method="auto"``: the model-free "dmn"; ``DEFAULT_BUDGET`` or more with "auto": "coefficients").
    spacing: the untuned program's spacing (default: the solver's).  reg: weight of the pull toward 1 of the
    "coefficients" multipliers.  Progress goes to stderr.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"budget must be an int >= 0 (network calls) or None, got {budget!r}")
    if not isinstance(noise, torch.Tensor) or noise.dim() < 2 or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor of shape (batch, ...), got "
                        f"{getattr(noise, 'shape', type(noise).__name__)}")
    if not torch.isfinite(noise).all():
        raise ValueError("noise holds non-finite values")
    n = noise.shape[0]
    n_hold = _holdout_size(holdout, n)
    if method == "auto":
        # "coefficients" from the default budget up, where it beat the grid alone in every case measured
        # (benchmarks/results/tune_digits.md): on the Gaussian-mixture oracle (tune_gmm.md's protocol) for
        # dpmpp_2m and unipc at NFE 4-6, error on fresh noise 3-26% lower; on the digits model a lower
        # Frechet distance for unipc and dpmpp_2m at NFE 4-8, at the same cost.  Below the default budget
        # the grid gets every call (coefficients not measured there).
        method = ("dmn" if budget == 0 else
                  "coefficients" if budget is None or budget >= DEFAULT_BUDGET else "timesteps")
    budget = DEFAULT_BUDGET if budget is None else budget
    try:
        base = build(solver, spec, nfe, spacing, guidance_scale=guidance_scale, **solver_options)
    except ValueError as e:
        raise ValueError(f"cannot tune {solver} at nfe={nfe}: {e}") from e
    if nfe < 2:
        raise ValueError(f"nfe={nfe}: tuning moves the grid between the first call and the end, which needs "
                         f"nfe >= 2")
    if min(base.sigmas) <= 0 or _program_at(list(base.sigmas), base.sigmas[0], solver, spec, nfe,
                                            guidance_scale, solver_options, base) is None:
        # e.g. heun (two calls per step: its calls are not its grid) or ddim (its own spacings only): no
        # candidate grid would ever build, and the search would hand back the untuned program
        raise ValueError(f"cannot tune {solver}: fs.tune moves one network call per grid point, and {solver} "
                         f"cannot be rebuilt on its own call points {_ts(base.timesteps)} (tune a solver "
                         f"that takes any grid, e.g. dpmpp_2m, unipc, deis, ipndm or euler)")
    say = _progress if verbose else (lambda msg: None)
    t0 = time.perf_counter()
    if method == "dmn":
        say(f"fs.tune: {solver} nfe={nfe}, dmn: model-free search on a Gaussian data model")
        proxy = torch.randn(64, _DMN_DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        fn = _counted(_oracle_fn(_gaussian(), spec), 0)
        prog_, rep = _search(fn, base, solver, nfe, guidance_scale, solver_options, proxy, None,
                             proxy.shape[0] // 4, budget or DEFAULT_BUDGET, teacher_nfe, False, reg, say)
        rep["note"] = "dmn: errors are on the Gaussian data model, not on the user's model"
    else:
        fn = _counted(_wrap_model(model, cond, n, base.guidance_scale), n)
        prog_, rep = _search(fn, base, solver, nfe, guidance_scale, solver_options, noise, cond,
                             n_hold, budget, teacher_nfe, method == "coefficients", reg, say)
    rep["seconds"] = time.perf_counter() - t0
    improved = rep["holdout_after"] < rep["holdout_before"]
    prog = prog_ if improved else base
    if improved:
        prog = dataclasses.replace(prog, options={**prog.options, "tuned": {"method": method, **{
            k: rep[k] for k in ("holdout_before", "holdout_after")}}})
    out = Tuned(prog, solver, nfe, method, improved, rep)
    say("fs.tune: " + out.summary())
    return out


# -- the search ---------------------------------------------------------------------------------------------
def _search(fn, base: StepProgram, solver, nfe, guidance, options, noise, cond, n_hold, budget,
            teacher_nfe, fit_coefficients, reg, say) -> tuple[StepProgram, dict]:
    spec = base.spec
    noise = noise.double()
    n_cal = noise.shape[0] - n_hold
    teacher = build(TEACHER_SOLVER, spec, teacher_nfe, "karras",
                    guidance_scale=guidance, final=base.options.get("final", "zero"))
    say(f"fs.tune: teacher {TEACHER_SOLVER} nfe={teacher_nfe} on {noise.shape[0]} samples")
    record: list[tuple[torch.Tensor, torch.Tensor]] = []
    target = run_reference(teacher, fn.recording(record), noise)
    xs = torch.stack([x[:n_cal] for x, _ in record])  # (N, n_cal, ...) the teacher's states at its calls
    raws = torch.stack([o[:n_cal] for _, o in record])  # guided raw outputs there
    cal, hold = slice(0, n_cal), slice(n_cal, None)

    def err(prog: StepProgram, part: slice) -> float:
        fn.select(part)
        x = run_reference(prog, fn, noise[part])
        fn.select(None)
        return float(((x - target[part]) ** 2).mean().sqrt())

    before_cal = err(base, cal)
    calls0 = fn.calls
    limit = calls0 + budget
    points = [c.point for c in teacher.calls] + [end_point(spec, str(base.options.get("final", "zero")))]
    sig_max = points[0].sigma_tilde  # no call above the schedule's start (where the teacher starts)
    cache: dict[tuple, float] = {base.timesteps: before_cal}

    def objective(sig: list[float]) -> tuple[float, StepProgram | None]:
        prog = _program_at(sig, sig_max, solver, spec, nfe, guidance, options, base)
        if prog is None:
            return math.inf, None
        if prog.timesteps not in cache:
            cache[prog.timesteps] = err(prog, cal)
        return cache[prog.timesteps], prog

    # starting points: the untuned grid, the GITS grids (start kept / free) and every fixed spacing of the
    # solver (at most len(SPACINGS) + 2 runs)
    paths = [_gits(spec, points, xs, raws, target[cal], nfe, free) for free in (False, True)]
    starts = [[points[i].sigma_tilde for i in path[:-1]] for path in paths]
    for sp in valid_spacings(spec):
        if sp not in ("timesteps", "sigmas"):
            try:
                starts.append(list(build(solver, spec, nfe, sp, guidance_scale=guidance, **options).sigmas))
            except ValueError:
                continue
    tried = [(before_cal, base, list(base.sigmas))]
    for cand in starts:
        if fn.calls + nfe > limit:
            break
        e, prog = objective(cand)
        if prog is not None and all(prog.timesteps != p.timesteps for _, p, _ in tried):
            tried.append((e, prog, cand))
    tried.sort(key=lambda c: c[0])
    say(f"fs.tune: calibration error untuned {before_cal:.4g}, best start {tried[0][0]:.4g} "
        f"(timesteps {_ts(tried[0][1].timesteps)}); refining")

    def descend(e, prog, u, delta, stop):
        """Coordinate descent on the log-sigmas (the start too: a later first call can beat one huge first
        step), halving the step when no move helps, until ``stop`` network calls."""
        while delta > 0.004 and fn.calls + 2 * nfe <= stop:
            moved = False
            for k in range(nfe):
                for d in (-delta, delta):
                    if fn.calls + nfe > stop:
                        break
                    trial = list(u)
                    trial[k] += d
                    e_t, p_t = objective([math.exp(v) for v in trial])
                    if e_t < e:
                        e, prog, u, moved = e_t, p_t, trial, True
                        break
            if not moved:
                delta /= 2
        return e, prog, u, delta

    # multi-start: the search space has several local minima (e.g. a grid that keeps the start vs one that
    # starts later), so the best _N_STARTS starts get a short descent each, then the best continues
    stop = calls0 + (0.5 if fit_coefficients else 1.0) * budget
    runs = [(e, prog, [math.log(v) for v in sig], 0.2) for e, prog, sig in tried[:_N_STARTS]]
    share = (stop - fn.calls) / (2 * len(runs))
    runs = [descend(*r, fn.calls + share) for r in runs]
    best_err, best, _, _ = descend(*min(runs, key=lambda r: r[0]), stop)
    after_grid = best_err
    mults = None
    if fit_coefficients:
        best, best_err, mults = _fit_coefficients(best, err, cal, fn, limit, nfe, reg, best_err)
    rep = {"solver": solver, "nfe": nfe, "calibration_samples": n_cal, "holdout_samples": n_hold,
           "teacher": f"{TEACHER_SOLVER} nfe={teacher_nfe}", "calibration_before": before_cal,
           "calibration_grid": after_grid, "calibration_after": best_err,
           "holdout_before": err(base, hold), "holdout_after": err(best, hold),
           "timesteps_before": list(base.timesteps), "timesteps_after": list(best.timesteps),
           "multipliers": mults, "network_calls": fn.calls, "budget": budget}
    return best, rep


def _fit_coefficients(prog: StepProgram, err, cal, fn, limit, nfe, reg, base_err):
    """Coordinate descent on one multiplier per call stage (network-output columns), pulled toward 1."""
    m = [1.0] * nfe

    def score(e: float, mm: list[float]) -> float:
        return e * (1.0 + reg * sum((v - 1.0) ** 2 for v in mm))

    best_prog, best_err, best_score = prog, base_err, base_err
    delta = 0.05
    while delta > 0.002 and fn.calls + nfe <= limit:
        moved = False
        for k in range(nfe):
            for d in (-delta, delta):
                if fn.calls + nfe > limit:
                    break
                trial = list(m)
                trial[k] += d
                p = _scaled(prog, trial)
                e = err(p, cal)
                s = score(e, trial)
                if s < best_score:
                    best_prog, best_err, best_score, m, moved = p, e, s, trial, True
                    break
        if not moved:
            delta /= 2
    return best_prog, best_err, m


def _scaled(prog: StepProgram, mults: list[float]) -> StepProgram:
    """``prog`` with the network-output columns (O_u, O_c) of the k-th call's stage times ``mults[k]``."""
    stages, k = [], 0
    for st in prog.stages:
        if st.call is not None:
            mat = np.array(st.matrix)
            for j, name in enumerate(st.inputs):
                if name in ("O_u", "O_c"):
                    mat[:, j] *= mults[k]
            mat.setflags(write=False)
            st = dataclasses.replace(st, matrix=mat)
            k += 1
        stages.append(st)
    return dataclasses.replace(prog, stages=tuple(stages),
                               options={**prog.options, "multipliers": tuple(mults)})


def _gits(spec: ModelSpec, points, xs: torch.Tensor, raws: torch.Tensor, end: torch.Tensor,
          nfe: int, free_start: bool) -> list[int]:
    """Dynamic programme over the teacher's call points: ``nfe`` steps from a start point to the end (the last
    index) minimising the summed squared distance of first-order (DDIM) steps taken from the teacher's states
    to the teacher's states (GITS, Chen et al. 2024).  With ``free_start`` the start may be any teacher point:
    starting at point ``i`` costs the distance between the noise placed there (``sigma_i * noise``, as every
    solver starts) and the teacher's state at ``i``."""
    n = len(points) - 1  # calls; index n is the end
    states = torch.cat([xs, end[None]]).flatten(1)
    noise = states[0] / points[0].sigma
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        cx, co = spec.x0_coeffs(points[i])
        ex, eo = spec.eps_coeffs(points[i])
        x, o = xs[i].flatten(), raws[i].flatten()
        x0, eps = cx * x + co * o, ex * x + eo * o
        for j in range(i + 1, n + 1):
            p = points[j]
            pred = p.alpha * x0 + p.sigma * eps
            cost[i, j] = float(((pred - states[j]) ** 2).mean())
    best = np.full((nfe + 1, n + 1), np.inf)
    arg = np.zeros((nfe + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    if free_start:
        best[0, 1:n] = [float(((points[i].sigma * noise - states[i]) ** 2).mean()) for i in range(1, n)]
    for s in range(1, nfe + 1):
        for j in range(1, n + 1):
            tot = best[s - 1, :j] + cost[:j, j]
            i = int(np.argmin(tot))
            best[s, j], arg[s, j] = tot[i], i
    path, j = [n], n
    for s in range(nfe, 0, -1):
        j = int(arg[s, j])
        path.append(j)
    return path[::-1]


def _program_at(sig: list[float], sig_max: float, solver, spec: ModelSpec, nfe, guidance, options,
                base) -> StepProgram | None:
    """The solver built on call sigmas ``sig`` (decreasing, none above ``sig_max``), or None where they do not
    make a valid grid."""
    if sig[0] > sig_max * (1 + 1e-9) or sig[-1] <= 0 or any(a <= b for a, b in zip(sig, sig[1:])):
        return None
    sched = spec.schedule
    if isinstance(sched, DiscreteVP):
        if spec.time_input == "sigma":
            sp = Spacing("sigmas", values=[*sig, 0.0])
        else:
            ts = np.asarray(sched.timesteps_of_sigmas(np.asarray(sig)), dtype=np.float64)
            if spec.time_input == "discrete":
                ts = np.round(ts)
            if np.any(np.diff(ts) >= 0) or ts.min() < 0:
                return None
            sp = Spacing("timesteps", values=ts.tolist())
    elif isinstance(sched, EDM):
        sp = Spacing("sigmas", values=[*sig, 0.0])
    else:
        assert isinstance(sched, Flow)
        sp = Spacing("sigmas", values=[s / (1.0 + s) for s in sig] + [0.0])
    try:
        return build(solver, spec, nfe, sp, guidance_scale=guidance, **options)
    except ValueError:
        return None




# -- model plumbing -----------------------------------------------------------------------------------------
class _counted:
    """``model_fn(x, t)`` for run_reference around the user's model: counts calls, checks for NaN, slices the
    batch-sized conditioning to the part of the noise being run, and can record (input, guided output)."""

    def __init__(self, fn, n: int):
        self.fn, self.n, self.calls, self.part, self._rec, self.guidance = fn, n, 0, None, None, None

    def select(self, part: slice | None) -> None:
        self.part = part

    def recording(self, rec: list):
        def f(x, t):
            out = self(x, t)
            self._record(rec, x, out)
            return out
        return f

    def _record(self, rec, x, out):
        g = getattr(self.fn, "guidance", None)
        if g is None:
            rec.append((x, out))
        else:
            xu, _ = x.chunk(2)
            ou, oc = out.chunk(2)
            rec.append((xu, ou + g * (oc - ou)))

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.calls += 1
        out = self.fn(x, t, self.part)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"fs.tune: the model returned non-finite values at t={t:g} (call "
                                     f"{self.calls}); tuning needs a model that is finite on the whole grid")
        return out


def _wrap_model(model, cond, n: int, guidance: float | None):
    """``fn(x, t, part)`` calling the user's model on its network's device and dtype (found as fs.compile
    finds them: the module itself or an adapter's ``.model``; else the CPU and float32); the search itself
    runs in float64 on the noise's device."""
    from ..quant.quantize_model import find_network

    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, **cond), got {type(model).__name__}")
    cond = dict(cond or {})
    for k, v in cond.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"cond[{k!r}] must be a tensor, got {type(v).__name__}")
    net = find_network(model)
    p = next(iter(net.parameters()), None) if net is not None else None
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    cond = {k: v.to(device) for k, v in cond.items()}

    def fn(x: torch.Tensor, t: float, part: slice | None) -> torch.Tensor:
        c = {k: (v[part] if part is not None and v.dim() and v.shape[0] == n else v) for k, v in cond.items()}
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=device)
        with torch.no_grad():
            out = model(x.to(device, dtype), tt, **c)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"model output must be a tensor of the input's shape {tuple(x.shape)}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        return out.to(x.device, torch.float64)  # the search runs where the noise is

    fn.guidance = guidance
    return fn


def _oracle_fn(gauss: GaussianMixture, spec: ModelSpec):
    inner = gauss.spec_model_fn(spec)

    def fn(x, t, part):
        return inner(x.double().flatten(1), t).reshape(x.shape)

    fn.guidance = None
    return fn


def _gaussian(sigma_data: float = 0.5) -> GaussianMixture:
    """N(0, sigma_data^2 I) in ``_DMN_DIM`` dimensions: the data model of ``method="dmn"``."""
    return GaussianMixture(np.ones(1), np.zeros((1, _DMN_DIM)), np.full((1, _DMN_DIM), sigma_data**2))


def _holdout_size(holdout: int | float, n: int) -> int:
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        raise TypeError(f"holdout must be an int (samples) or a fraction in (0, 1), got {holdout!r}")
    k = int(holdout) if isinstance(holdout, int) else int(round(holdout * n))
    if isinstance(holdout, float) and not 0 < holdout < 1:
        raise ValueError(f"holdout as a fraction must lie in (0, 1), got {holdout}")
    if k < _MIN_SPLIT or n - k < _MIN_SPLIT:
        raise ValueError(f"noise batch of {n} is too small to hold out from: tuning needs at least "
                         f"{_MIN_SPLIT} calibration and {_MIN_SPLIT} held-out samples (holdout={holdout} -> "
                         f"{k} held out); pass more noise")
    return k


def _spec_text(have: ModelSpec, want: ModelSpec) -> str:
    a, b = have.describe(), want.describe()
    if a == b:
        a, b = repr(have), repr(want)
    return f"{a}, not {b}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _ts(ts) -> str:
    return "(" + ", ".join(f"{t:g}" for t in ts) + ")"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def program_for(solver: "str | Tuned", spec: ModelSpec, nfe: int, spacing: Any = None, *,
                guidance_scale: float | None = None, **options: Any) -> StepProgram:
    """The program ``fs.compile`` / ``fs.Engine`` run: ``build(...)`` for a solver name, or a tuned solver's
    own program after checking it was tuned for this spec, nfe and guidance scale (spacing and solver options
    are part of a tuned program and cannot be given again)."""
    if not isinstance(solver, Tuned):
        return build(solver, spec, nfe, spacing, guidance_scale=guidance_scale, **options)
    if spacing is not None or options:
        given = (["spacing"] if spacing is not None else []) + sorted(options)
        raise ValueError(f"solver=<tuned {solver.solver}> fixes its grid and options; do not pass {given}")
    solver.check_fits(spec, nfe, guidance_scale)
    return solver.program
