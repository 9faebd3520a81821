"""``fewstep accuracy``: RMS error of every deterministic solver against an exact probability-flow ODE oracle.

The data distribution is a Gaussian mixture (:mod:`fewstep.solvers.gmm`), so the ideal network is known in
closed form and the ODE endpoint can be computed to ~1e-10 with scipy's DOP853.  For each deterministic solver
in the registry (default options) every spacing the schedule allows is tried at every NFE of the row; the
spacing with the lowest mean log error is reported (the oracle chooses it).  Next to it, the same cell for
the equivalent diffusers scheduler (``fs.solvers.to_diffusers``) run through diffusers' own loop on the same
network and noise, measured against the same reference.  The error measures discretization only: the
reference starts where the solver's first network call is (the prologue's sample) and ends where the solver
ends.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import solvers as S
from ..solvers.gmm import GaussianMixture, point_of_time, program_error, rms
from ..solvers.schedules import EDM, DiscreteVP, Flow, Point
from ..solvers.spec import ModelSpec
from .checks import positive_int_arg, writable_file

__all__ = ["NFES", "Row", "Table", "accuracy_table", "default_spec", "diffusers_error", "add_arguments",
           "run", "main"]

NFES = (4, 5, 6, 8, 10, 15, 20)
SCHEDULES = ("vp", "flow", "edm")
TUNE_SEED = 1_000_003  # calibration noise of the tuned rows (the table's noise uses seed + 1)


@dataclass
class Row:
    """One solver: its chosen spacing, its error per NFE (None: the solver cannot do that NFE) and the
    diffusers scheduler's (None: no equivalent or not that NFE; ``diffusers_note`` says why)."""

    solver: str
    spacing: str
    errors: dict[int, float | None]
    diffusers_name: str | None = None
    diffusers_errors: dict[int, float | None] = field(default_factory=dict)
    diffusers_note: str = ""
    tried: dict[str, float] = field(default_factory=dict)  # spacing -> score (mean log10 error)
    build_failures: list[str] = field(default_factory=list)  # build errors (not "cannot do this NFE"), NaNs
    alt: "Row | None" = None  # where diffusers cannot run the best spacing: the best spacing it can run


@dataclass
class Table:
    spec: ModelSpec
    nfes: tuple[int, ...]
    rows: list[Row]
    gmm: GaussianMixture
    noise: torch.Tensor
    diffusers_available: bool
    diffusers_reason: str = ""
    seconds: float = 0.0


def default_spec(schedule: str = "vp") -> ModelSpec:
    """The spec of the table: "vp" (Stable-Diffusion-like scaled_linear, epsilon), "flow" (SD3-like, shift 3)
    or "edm" (Karras et al., epsilon)."""
    if schedule == "vp":
        return ModelSpec(DiscreteVP(), "epsilon")
    if schedule == "flow":
        return ModelSpec(Flow(shift=3.0), "flow")
    if schedule == "edm":
        return ModelSpec(EDM(), "epsilon")
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def candidate_spacings(spec: ModelSpec) -> list[str]:
    """Every named spacing valid for ``spec`` (explicit timestep / sigma lists left out)."""
    out = []
    for name in S.SPACINGS:
        if name in ("timesteps", "sigmas"):
            continue
        try:
            S.spacing.as_spacing(name, spec)
        except ValueError:
            continue
        out.append(name)
    return out


def deterministic_solvers() -> list[str]:
    """Registered solvers that draw no noise with their default options."""
    out = []
    for name in S.available():
        info = S.get(name)
        if not info.is_stochastic(info.options()):
            out.append(name)
    return out


def _score(errors: dict[int, float | None]) -> tuple[int, float]:
    """Sort key for a spacing: most cells first, then the lowest mean log10 error over them."""
    vals = [e for e in errors.values() if e is not None]
    if not vals:
        return (0, math.inf)
    if not all(math.isfinite(e) and e > 0 for e in vals):
        return (0, math.inf)
    return (-len(vals), float(np.mean(np.log10(vals))))


def _solver_errors(name: str, spec: ModelSpec, spacing: str, nfes: Sequence[int], gmm: GaussianMixture,
                   noise: torch.Tensor, cache: dict,
                   failures: list[str]) -> tuple[dict[int, float | None], dict[int, float]]:
    """Errors per NFE (None where the solver cannot build) and the sigma_tilde of each first network call.
    Build errors other than ValueError (a solver bug, not an impossible NFE) and non-finite samples are
    appended to ``failures``."""
    errs: dict[int, float | None] = {}
    starts: dict[int, float] = {}
    for n in nfes:
        try:
            prog = S.build(name, spec, n, spacing=spacing)
        except ValueError:
            errs[n] = None  # e.g. heun at an even NFE, a spacing the solver does not take
            continue
        except Exception as e:
            errs[n] = None
            failures.append(f"build({spacing}, nfe={n}) raised {type(e).__name__}: {e}")
            continue
        errs[n] = program_error(gmm, prog, noise, cache)
        starts[n] = prog.calls[0].point.sigma_tilde
        if not math.isfinite(errs[n]):
            failures.append(f"{spacing}, nfe={n}: non-finite sample (error {errs[n]})")
    return errs, starts


def _eligible(starts: dict[str, dict[int, float]]) -> list[str]:
    """Spacings whose first call is at (nearly) the highest noise level of all candidates at every NFE.

    The error is measured from the solver's own first point, so a grid that starts lower (``leading`` at low
    NFE, AYS tables on EDM) integrates a shorter path and would win for the wrong reason."""
    top = {}
    for st in starts.values():
        for n, s in st.items():
            top[n] = max(top.get(n, 0.0), s)
    ok = [sp for sp, st in starts.items() if st and all(s >= 0.9 * top[n] for n, s in st.items())]
    return ok or list(starts)


# -- diffusers -----------------------------------------------------------------------------------------------
def _diffusers_import() -> tuple[bool, str]:
    try:
        import diffusers  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"diffusers is not importable ({type(e).__name__}: {e}); pip install 'fewstep[test]'"
    return True, ""


def _scheduler_points(sch: Any, spec: ModelSpec) -> Callable[[float], Point]:
    """time input -> Point from the scheduler's own tables after set_timesteps: the i-th call is at
    ``sigmas[i]`` (checked against ``timesteps[i]``; rounding can give two calls the same timestep with
    different sigmas).  Schedulers without sigmas (DDIM / LCM / TCD: integer timesteps) use the spec's map."""
    sched = spec.schedule
    ts = [float(t) for t in sch.timesteps.tolist()]
    sig = getattr(sch, "sigmas", None)
    if sig is None or len(sig) < len(ts) or isinstance(sched, EDM):
        return lambda t: point_of_time(spec, t)
    sig = torch.as_tensor(sig).double().tolist()
    state = {"i": 0}

    def to_point(t: float) -> Point:
        i = state["i"]
        state["i"] = i + 1
        if i >= len(ts) or ts[i] != t:
            raise RuntimeError(f"diffusers called the network at t={t}, expected call {i} at {ts[i:i + 1]}")
        if isinstance(sched, DiscreteVP):
            return sched.point_at_sigma(sig[i], t)
        return sched.point_at_t(sig[i], t)

    return to_point


def diffusers_error(name: str, spec: ModelSpec, spacing: str, nfe: int, gmm: GaussianMixture,
                    noise: torch.Tensor, reference: torch.Tensor,
                    expect_times: Sequence[float] | None = None) -> float | None:
    """RMS error of the diffusers equivalent of ``name`` with ``nfe`` network calls, run through diffusers'
    own loop (scale_model_input, model, step) on the exact network; None where no step count gives ``nfe``
    calls.  Raises ValueError where there is no equivalent, or where the network times differ from
    ``expect_times`` (diffusers ran another grid, so the cell would not be comparable)."""
    steps = None
    for s in range(1, nfe + 1):  # the step count whose schedule makes nfe calls (heun: 2 s - 1)
        sch = S.to_diffusers(name, spec, spacing)
        sch.set_timesteps(s)
        if len(sch.timesteps) == nfe:
            steps = s
            break
    if steps is None:
        return None
    times = [float(t) for t in sch.timesteps.tolist()]
    if expect_times is not None and not np.allclose(times, expect_times, rtol=0, atol=1e-3):
        raise ValueError(f"diffusers' {type(sch).__name__} runs other timesteps at nfe={nfe} "
                         f"({_short(times)} vs fewstep {_short(expect_times)})")
    model = gmm.spec_model_fn(spec, _scheduler_points(sch, spec))
    x = noise.double() * float(getattr(sch, "init_noise_sigma", 1.0))
    scale = getattr(sch, "scale_model_input", None)
    for t in sch.timesteps:
        inp = scale(x, t) if scale is not None else x
        out = model(inp, float(t))
        x = sch.step(out, t, x).prev_sample
    return rms(x, reference)


def _short(v: Sequence[float]) -> str:
    v = [round(float(t), 3) for t in v]
    return str(v) if len(v) <= 6 else f"[{v[0]}, {v[1]}, {v[2]}, ..., {v[-1]}]"


def _diffusers_row(row: Row, spec: ModelSpec, nfes: Sequence[int], gmm: GaussianMixture, noise: torch.Tensor,
                   cache: dict) -> None:
    if spec.schedule.kind == "edm":
        row.diffusers_note = "diffusers' EDM schedulers precondition the network differently: not compared"
        return
    try:
        sch = S.to_diffusers(row.solver, spec, row.spacing)
    except (ValueError, TypeError, AttributeError) as e:
        row.diffusers_note = f"no diffusers equivalent: {e}"
        return
    row.diffusers_name = type(sch).__name__
    for n in nfes:
        if row.errors.get(n) is None:
            row.diffusers_errors[n] = None
            continue
        prog = S.build(row.solver, spec, n, spacing=row.spacing)
        ref = gmm.ode_reference(prog, noise)
        try:
            row.diffusers_errors[n] = diffusers_error(row.solver, spec, row.spacing, n, gmm, noise, ref,
                                                      expect_times=prog.timesteps)
        except ValueError as e:
            row.diffusers_errors[n] = None
            row.diffusers_note = str(e)
        except Exception as e:  # diffusers raising inside its own loop is a finding, not a crash of the table
            row.diffusers_errors[n] = None
            row.diffusers_note = f"diffusers failed at nfe={n}: {type(e).__name__}: {e}"


def _no_numbers(cells: dict[int, float | None]) -> bool:
    return all(e is None for e in cells.values())


def accuracy_table(spec: ModelSpec | None = None, nfes: Sequence[int] = NFES, *,
                   solvers: Sequence[str] | None = None, spacings: Sequence[str] | None = None,
                   samples: int = 64, dim: int = 4, components: int = 4, seed: int = 0,
                   compare_diffusers: bool = True, progress: Callable[[str], None] | None = None) -> Table:
    """Compute the accuracy table (see the module docstring); ``solvers`` / ``spacings`` restrict it."""
    t0 = time.perf_counter()
    spec = spec or default_spec("vp")
    nfes = tuple(int(n) for n in nfes)
    if not nfes or any(n < 1 for n in nfes):
        raise ValueError(f"NFE values must be >= 1, got {nfes}")
    known = deterministic_solvers()
    if solvers is None:  # by default, only the solvers that run on this schedule (flow_* need a Flow spec)
        solvers = [s for s in known if _runs_on(s, spec, nfes)]
    else:
        bad = [s for s in solvers if s not in known]
        if bad:
            raise ValueError(f"not deterministic solvers: {bad}; valid: {', '.join(known)}")
    cands = candidate_spacings(spec)
    if spacings is not None:
        bad = [s for s in spacings if s not in cands]
        if bad:
            raise ValueError(f"spacings {bad} do not fit {spec.describe()}; valid: {', '.join(cands)}")
        cands = list(spacings)
    gmm = GaussianMixture.random(d=dim, k=components, seed=seed, spread=1.0, var_range=(0.05, 0.3))
    noise = torch.randn(samples, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ok, reason = _diffusers_import() if compare_diffusers else (False, "disabled with --no-diffusers")
    cache: dict = {}
    rows = []
    say = progress or (lambda msg: None)
    for i, name in enumerate(solvers):
        ts = time.perf_counter()
        tried, starts, failures = {}, {}, []
        for sp in cands:
            tried[sp], starts[sp] = _solver_errors(name, spec, sp, nfes, gmm, noise, cache, failures)
        eligible = sorted(_eligible(starts), key=lambda sp: _score(tried[sp]))
        best = eligible[0]
        row = Row(name, best, tried[best], tried={sp: _score(e)[1] for sp, e in tried.items()})
        if all(e is None for e in row.errors.values()):
            row.spacing = "-"
            row.diffusers_note = f"{name} builds for none of these NFE / spacings on {spec.describe()}"
        elif ok:
            _diffusers_row(row, spec, nfes, gmm, noise, cache)
            retry = _no_numbers(row.diffusers_errors) and spec.schedule.kind != "edm"
            for sp in eligible[1:] if retry else ():
                alt = Row(name, sp, tried[sp])
                _diffusers_row(alt, spec, nfes, gmm, noise, cache)
                if not _no_numbers(alt.diffusers_errors):
                    row.alt = alt
                    break
        else:
            row.diffusers_note = reason
        if failures:
            row.build_failures = failures
            say(f"  {name}: {len(failures)} failure(s), first: {failures[0]}")
        rows.append(row)
        say(f"[{i + 1}/{len(solvers)}] {name}: best spacing {row.spacing} of {len(cands)} "
            f"({time.perf_counter() - ts:.1f}s)")
    return Table(spec, nfes, rows, gmm, noise, ok, reason, time.perf_counter() - t0)


def _runs_on(name: str, spec, nfes) -> bool:
    for n in nfes:
        try:
            S.build(name, spec, n)
            return True
        except ValueError:
            continue
    return False


# -- output --------------------------------------------------------------------------------------------------
def _cell(e: float | None) -> str:
    return "-" if e is None else f"{e:.2e}"


def format_text(table: Table) -> str:
    g = table.gmm
    head = (f"RMS error vs the exact probability-flow ODE endpoint: Gaussian mixture d={g.dim}, "
            f"K={len(g.weights)}, {table.noise.shape[0]} samples\n{table.spec.describe()}\n"
            f"spacing per solver: the lowest mean log error over the row among spacings that start at the "
            f"highest noise level (chosen by the oracle)\n"
            f"'-': an NFE the solver cannot do, or no comparable diffusers run (reason below the row)")
    if not table.diffusers_available:
        head += f"\ndiffusers column: {table.diffusers_reason}"
    w = max([len(r.solver) for r in table.rows] + [12])
    lines = [head, "", f"{'solver':{w}s}  {'spacing':11s} {'impl':9s} " + " ".join(f"{'nfe=' + str(n):>9s}"
                                                                               for n in table.nfes)]
    for r in table.rows:
        lines.append(f"{r.solver:{w}s}  {r.spacing:11s} {'fewstep':9s} "
                     + " ".join(f"{_cell(r.errors.get(n)):>9s}" for n in table.nfes))
        if r.diffusers_name is not None:
            lines.append(f"{'':{w}s}  {'':11s} {'diffusers':9s} "
                         + " ".join(f"{_cell(r.diffusers_errors.get(n)):>9s}" for n in table.nfes)
                         + f"  {r.diffusers_name}")
        if r.diffusers_note and table.diffusers_available:
            lines.append(f"{'':{w}s}  ({r.diffusers_note})")
        if r.build_failures:
            lines.append(f"{'':{w}s}  (FAILURES: {len(r.build_failures)}, first: {r.build_failures[0]})")
        if r.alt is not None:
            a = r.alt
            lines.append(f"{'':{w}s}  {a.spacing:11s} {'fewstep':9s} "
                         + " ".join(f"{_cell(a.errors.get(n)):>9s}" for n in table.nfes)
                         + "  (the best spacing diffusers can run)")
            lines.append(f"{'':{w}s}  {'':11s} {'diffusers':9s} "
                         + " ".join(f"{_cell(a.diffusers_errors.get(n)):>9s}" for n in table.nfes)
                         + f"  {a.diffusers_name}")
    return "\n".join(lines)


def format_markdown(table: Table) -> str:
    g = table.gmm
    lines = [f"RMS error vs the exact ODE endpoint (Gaussian mixture d={g.dim}, K={len(g.weights)}, "
             f"{table.noise.shape[0]} samples; {table.spec.describe()}; best spacing per solver chosen by "
             f"the oracle).", "",
             "| solver | spacing | implementation | " + " | ".join(f"NFE {n}" for n in table.nfes) + " |",
             "|---|---|---|" + "---:|" * len(table.nfes)]
    for r in table.rows:
        lines.append(f"| {r.solver} | {r.spacing} | fewstep | "
                     + " | ".join(_cell(r.errors.get(n)) for n in table.nfes) + " |")
        if r.diffusers_name is not None:
            lines.append(f"| | | diffusers {r.diffusers_name} | "
                         + " | ".join(_cell(r.diffusers_errors.get(n)) for n in table.nfes) + " |")
        if r.alt is not None:
            lines.append(f"| | {r.alt.spacing} | fewstep | "
                         + " | ".join(_cell(r.alt.errors.get(n)) for n in table.nfes) + " |")
            lines.append(f"| | | diffusers {r.alt.diffusers_name} | "
                         + " | ".join(_cell(r.alt.diffusers_errors.get(n)) for n in table.nfes) + " |")
    if not table.diffusers_available:
        lines += ["", f"diffusers column: {table.diffusers_reason}"]
    return "\n".join(lines) + "\n"


def save_plot(table: Table, path: str) -> None:
    """Error vs NFE on log-log axes: fewstep solid, diffusers dashed (same colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(table.rows):
        pts = [(n, e) for n, e in r.errors.items() if e is not None]
        if not pts:
            continue
        c = cmap(i % 20)
        ax.plot(*zip(*pts), "o-", color=c, label=f"{r.solver} ({r.spacing})")
        for d in (r, r.alt):
            dpts = [(n, e) for n, e in (d.diffusers_errors.items() if d is not None else ()) if e is not None]
            if dpts:
                lab = None if d is r else f"diffusers {r.solver} ({d.spacing})"
                ax.plot(*zip(*dpts), "x--", color=c, alpha=0.7, label=lab)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(table.nfes))
    ax.set_xticklabels([str(n) for n in table.nfes])
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMS error vs exact ODE endpoint")
    ax.set_title(f"fewstep accuracy: {table.spec.describe()}\n(solid: fewstep, dashed x: diffusers)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- CLI -----------------------------------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def _str_list(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def tuned_rows(table: Table, *, samples: int = 128, progress: Callable[[str], None] | None = None
               ) -> dict[str, dict[int, float | None]]:
    """Per solver of ``table``: the error of ``fs.tune``'s grid (method "timesteps", fitted on ``samples``
    other noises, seed TUNE_SEED) on the table's own noise, per NFE (None: the solver cannot do that NFE)."""
    spec, gmm = table.spec, table.gmm

    def model(x, t, **cond):
        return gmm.output(x.double(), point_of_time(spec, float(t[0])), spec.prediction).to(x.dtype)

    calib = torch.randn(samples, gmm.dim, generator=torch.Generator().manual_seed(TUNE_SEED))
    out: dict[str, dict[int, float | None]] = {}
    cache: dict = {}
    for row in table.rows:
        errs: dict[int, float | None] = {}
        for n in table.nfes:
            if row.errors.get(n) is None or n < 2:
                errs[n] = None
                continue
            try:
                tu = S.tune(model, spec, solver=row.solver, nfe=n, noise=calib, method="timesteps",
                            spacing=row.spacing, verbose=False)
            except ValueError:
                errs[n] = None
                continue
            errs[n] = program_error(gmm, tu.program, table.noise, cache)
        out[row.solver] = errs
        if progress:
            progress(f"tuned {row.solver}: " + " ".join(_cell(e) for e in errs.values()))
    return out


def format_tuned(table: Table, tuned: dict[str, dict[int, float | None]], markdown: bool = False) -> str:
    """The tuned rows beside each solver's best fixed spacing (same noise, same oracle)."""
    if markdown:
        lines = ["| solver | grid | " + " | ".join(f"NFE {n}" for n in table.nfes) + " |",
                 "|---|---|" + "---|" * len(table.nfes)]
        for r in table.rows:
            for name, cells in ((r.spacing, r.errors), ("tuned", tuned.get(r.solver, {}))):
                lines.append(f"| {r.solver} | {name} | " + " | ".join(_cell(cells.get(n)) for n in table.nfes)
                             + " |")
        return "\n".join(lines)
    w = max(len(r.solver) for r in table.rows)
    lines = [f"{'solver':{w}s}  {'grid':11s} " + " ".join(f"{'nfe=' + str(n):>9s}" for n in table.nfes)]
    for r in table.rows:
        for name, cells in ((r.spacing, r.errors), ("tuned", tuned.get(r.solver, {}))):
            lines.append(f"{r.solver:{w}s}  {name:11s} " + " ".join(f"{_cell(cells.get(n)):>9s}"
                                                                    for n in table.nfes))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", choices=SCHEDULES, default="vp",
                        help="vp: SD-like scaled_linear epsilon; flow: SD3-like shift 3; edm: Karras et al.")
    parser.add_argument("--nfe", type=_int_list, default=list(NFES), help="comma-separated NFE values")
    parser.add_argument("--solvers", type=_str_list, default=None, help="comma-separated subset of solvers")
    parser.add_argument("--spacings", type=_str_list, default=None, help="comma-separated spacings to try")
    parser.add_argument("--samples", type=positive_int_arg, default=64, help="noise samples per cell")
    parser.add_argument("--dim", type=positive_int_arg, default=4, help="dimension of the Gaussian mixture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers column")
    parser.add_argument("--out", default="accuracy.png", help="PNG plot path (default accuracy.png)")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also write a markdown table")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--tuned", action="store_true",
                        help="also a tuned row per solver: fs.tune's grid, fitted on other noise")


def run(args: argparse.Namespace) -> int:
    """``fewstep accuracy``: compute, print, plot (and optionally write markdown)."""
    if args.samples < 1 or args.dim < 1:
        raise ValueError("--samples and --dim must be >= 1")
    # the outputs are checked before the table (minutes of work) is computed
    writable_file(args.out, "--out")
    if args.markdown:
        writable_file(args.markdown, "--markdown")
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError("the plot (--out) needs matplotlib: pip install matplotlib")
    progress = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    table = accuracy_table(default_spec(args.schedule), args.nfe, solvers=args.solvers,
                           spacings=args.spacings, samples=args.samples, dim=args.dim, seed=args.seed,
                           compare_diffusers=not args.no_diffusers, progress=progress)
    print(format_text(table))
    tuned = tuned_rows(table, progress=progress) if args.tuned else None
    if tuned is not None:
        print("\n" + format_tuned(table, tuned))
    save_plot(table, args.out)
    print(f"\nplot: {args.out}" + (f"; markdown: {args.markdown}" if args.markdown else "")
          + f" ({table.seconds:.1f}s)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(table))
            if tuned is not None:
                f.write("\n" + format_tuned(table, tuned, markdown=True) + "\n")
    return 0


def main(argv: "argparse.Namespace | Sequence[str] | None" = None, **kwargs: Any) -> int:
    """Entry point: an argparse Namespace, an argv list or keywords (``main(nfe=[4, 8], out=...)``)."""
    if isinstance(argv, argparse.Namespace):
        return run(argv)
    parser = argparse.ArgumentParser(prog="fewstep accuracy")
    add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else ([] if kwargs else None))
    for k, v in kwargs.items():
        if not hasattr(args, k):
            raise TypeError(f"unknown accuracy option {k!r}")
        setattr(args, k, v)
    return run(args)


if __name__ == "__main__":  # errors as one line, like `fewstep accuracy`
    from . import main as fewstep_main

    sys.exit(fewstep_main(["accuracy", *sys.argv[1:]]))
