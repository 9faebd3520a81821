"""Mutation testing of the modules where a silent numeric mistake costs users most (``make mutate``).

Runs mutmut (https://github.com/boxed/mutmut) once per group of modules, each in its own copy of the tree
under ``build/mutate/<group>/`` (the checkout itself is never touched), with only the tests that exercise that
group, and writes ``docs/mutation.md``: killed / survived / timed out per module, the score, run time, machine
and git SHA, and every surviving mutant with its diff and, where it does not change behaviour, the reason.

    python scripts/mutate.py                 # every group, then the report
    python scripts/mutate.py --group calibrate --group engine_keys   # re-run some groups, report all
    python scripts/mutate.py --report-only   # rebuild the report from the last results

mutmut forks one worker per mutant from a process that already imported torch and the tests, and runs only
the tests that called the mutated function (fastest first, stopping at the first failure), so a mutant costs
well under a second when it is killed.  Only functions are mutated (mutmut leaves module-level constants and
decorated functions alone, so the ``@triton.jit`` kernel bodies are never mutated: see docs/mutation.md).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutate"
REPORT = ROOT / "docs" / "mutation.md"

# Lines that only build an error message: a changed message is not a silent numeric mistake, and the tests
# that check each error's wording live beside the checks (test_build_errors, test_inputs, ...).
# mutmut skips every expression that starts on a matching line, so a multi-line raise is skipped whole.
SKIP_LINE_PATTERNS = [r"^\s*raise \w+\(", r"warnings\.warn\("]


@dataclass(frozen=True)
class Group:
    """Modules mutated together, the functions in them to mutate, and the tests that judge them."""

    name: str
    modules: tuple[str, ...]  # source files, relative to the repository root
    tests: tuple[str, ...]  # pytest paths / node ids given to mutmut's test selection
    functions: tuple[str, ...] = ("*",)  # qualified-name globs ("_multistep", "StageUpdate.*") to mutate
    skip: tuple[str, ...] = ("*.__post_init__",)  # ... and to leave alone (options validation by default)


GAPS = "tests/mutation_gaps"
GROUPS: tuple[Group, ...] = (
    Group("dpm", ("fewstep/solvers/algo_dpm.py",),
          ("tests/solvers/test_dpm_parity.py", GAPS,
           "tests/solvers/test_convergence.py::test_converges_at_nominal_order[dpmpp_3m[taylor_d2=True]]"),
          functions=("_phis", "_dpmpp_step", "_ratio", "multistep_orders", "_multistep", "dpmpp_2m",
                     "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde")),
    Group("unipc", ("fewstep/solvers/algo_unipc.py",), ("tests/solvers/test_unipc_parity.py", GAPS),
          functions=("_uni_coeffs", "_uni_base", "_uni_update", "unipc")),
    Group("solvers_other",
          ("fewstep/solvers/algo_consistency.py", "fewstep/solvers/algo_deis.py",
           "fewstep/solvers/algo_ipndm.py", "fewstep/solvers/_math.py"),
          ("tests/solvers/test_consistency_parity.py", "tests/solvers/test_ipndm_parity.py",
           "tests/solvers/test_deis_parity.py", GAPS),
          functions=("cm", "logrho_weights", "ipndm", "multistep_order", "init_scale", "first_order",
                     "expm1_neg")),
    Group("spacing", ("fewstep/solvers/spacing.py",), ("tests/solvers/test_schedules.py", GAPS),
          functions=("karras_sigmas", "exponential_sigmas", "loglinear_interp", "_flow_shift")),
    Group("program_builder", ("fewstep/solvers/build.py",),
          ("tests/solvers/test_program.py", "tests/solvers/test_build_errors.py", GAPS),
          functions=("build",)),
    Group("solver_update", ("fewstep/kernels/solver_update.py",),
          ("tests/kernels/test_solver_update.py", GAPS),
          functions=("pick_config", "solver_update", "ref_noise", "solver_update_ref")),
    Group("fp8_references",
          ("fewstep/kernels/quantize_fp8.py", "fewstep/kernels/adaln_quant.py"),
          ("tests/kernels/test_fp8_quantize.py", "tests/kernels/test_fp8_adaln_quant.py", GAPS),
          functions=("round_e4m3_ref", "quantize_fp8_ref", "adaln_modulate_ref", "adaln_quant_ref")),
    Group("calibrate", ("fewstep/quant/calibrate.py",), ("tests/quant/test_calibrate.py", GAPS),
          functions=("Calibrator.wrap", "Calibrator._observer", "Calibrator._range", "Calibrator.finish")),
    Group("adapter_guidance", ("fewstep/models/diffusers_adapters.py",),
          ("tests/models/test_adapters.py", GAPS),
          functions=("_guided", "_batched", "_pair", "_out")),
    Group("engine_keys", ("fewstep/engine/engine.py",),
          ("tests/engine/test_inputs.py", "tests/engine/test_engine_keys.py",
           "tests/engine/test_plan.py::test_engine_caches_plans_per_shape",
           "tests/engine/test_threads.py::test_engine_builds_a_new_shape_once",
           "tests/engine/test_threads.py::test_a_build_does_not_block_other_shapes", GAPS),
          functions=("Engine.plan_for",)),
)


def qualnames(path: Path) -> list[str]:
    """Top-level functions and methods of top-level classes, as ``f`` / ``Cls.m``."""
    tree = ast.parse(path.read_text())
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(node.name)
        elif isinstance(node, ast.ClassDef):
            out += [f"{node.name}.{m.name}" for m in node.body
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return out


def chosen_functions(group: Group, module: str) -> list[str]:
    return [q for q in qualnames(ROOT / module)
            if any(fnmatch.fnmatchcase(q, f) for f in group.functions)
            and not any(fnmatch.fnmatchcase(q, f) for f in group.skip)]


def mutmut_prefix(module: str, qualname: str) -> str:
    """mutmut's name of a function: ``pkg.mod.x_f`` or ``pkg.mod.xǁClsǁm``."""
    dotted = module[:-3].replace("/", ".")
    cls, _, fn = qualname.rpartition(".")
    return f"{dotted}.x\u01c1{cls}\u01c1{fn}" if cls else f"{dotted}.x_{fn}"


def unregister_decorators(src: str) -> str:
    """``@register(...)`` above a solver function becomes ``f = register(...)(f)`` below it: mutmut leaves
    decorated functions alone, and the solver entry points (the step loops) are decorated.  Same behaviour."""
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    for node in sorted(tree.body, key=lambda n: n.lineno, reverse=True):
        if not isinstance(node, ast.FunctionDef) or not node.decorator_list:
            continue
        decs = [ast.get_source_segment(src, d) for d in node.decorator_list]
        if not all(d.startswith("register(") for d in decs):
            continue
        after = "".join(f"{node.name} = {d}({node.name})\n" for d in reversed(decs))
        lines.insert(node.end_lineno, after)
        del lines[node.decorator_list[0].lineno - 1: node.lineno - 1]
    return "".join(lines)


@dataclass
class Outcome:
    group: str
    seconds: float  # wall clock
    cpu_seconds: float = 0.0  # user + system time of mutmut and its workers: what an idle machine would need
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> status -> count
    survivors: dict[str, str] = field(default_factory=dict)  # mutant name -> diff


def _mutmut_bin() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        raise SystemExit(f"mutmut not found next to {sys.executable}: install the extra with "
                         "`pip install -e '.[mutate]'` (make mutate does)")
    return str(exe)


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def prepare(group: Group) -> Path:
    """A fresh copy of the package and tests for ``group``, with mutmut's settings in its pyproject.toml."""
    wd = WORK / group.name
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "fewstep", wd / "fewstep", ignore=ignore)
    shutil.copytree(ROOT / "tests", wd / "tests", ignore=ignore)
    for module in group.modules:
        (wd / module).write_text(unregister_decorators((ROOT / module).read_text()))
    tests = [t for t in group.tests if (ROOT / t.split("::")[0]).exists()]
    settings = f"""
[tool.mutmut]
source_paths = ["fewstep"]
only_mutate = {_toml_list(group.modules)}
pytest_add_cli_args_test_selection = {_toml_list(tests)}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:benchmark"]
do_not_mutate_patterns = {_toml_list(SKIP_LINE_PATTERNS)}
use_git_change_detection = false
track_dependencies = false
use_setproctitle = false
"""
    (wd / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + settings)
    return wd


def _status_table() -> dict:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code


def _selected(prefixes: list[str], key: str) -> bool:
    return key.partition("__mutmut_")[0] in prefixes


def run_group(group: Group, children: int) -> Outcome:
    wd = prepare(group)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRITON_INTERPRET="1",
               PYTHONDONTWRITEBYTECODE="1")
    prefixes = {m: [mutmut_prefix(m, q) for q in chosen_functions(group, m)] for m in group.modules}
    globs = [p + "*" for ps in prefixes.values() for p in ps]
    args = [_mutmut_bin(), "run", "--max-children", str(children), *globs]
    print(f"== {group.name}: {' '.join(group.modules)}", flush=True)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(wd / "mutmut.log", "w") as log:
        rc = subprocess.call(args, cwd=wd, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # mutmut and every worker it forked and waited for
    cpu_seconds = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if rc != 0:
        tail = (wd / "mutmut.log").read_text()[-3000:]
        raise SystemExit(f"mutmut failed for group {group.name} (exit {rc}); log {wd / 'mutmut.log'}:\n"
                         + tail)
    status_by_exit_code = _status_table()
    out = Outcome(group.name, seconds, cpu_seconds)
    for module in group.modules:
        meta = wd / "mutants" / (module + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        counts: dict[str, int] = {}
        for key, code in sorted(codes.items()):
            if not _selected(prefixes[module], key):
                continue
            status = status_by_exit_code[code]
            counts[status] = counts.get(status, 0) + 1
            if status not in ("killed", "timeout"):
                diff = subprocess.run([_mutmut_bin(), "show", key], cwd=wd, env=env, capture_output=True,
                                      text=True).stdout
                out.survivors[key] = f"[{status}]\n" + diff
        out.counts[module] = counts
    (wd / "outcome.json").write_text(json.dumps(out.__dict__, indent=1))
    print(f"   {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU: {out.counts}", flush=True)
    return out


def load_outcome(group: Group) -> Outcome | None:
    p = WORK / group.name / "outcome.json"
    return Outcome(**json.loads(p.read_text())) if p.exists() else None


# Surviving mutants that do not change behaviour, by mutmut's name, with the reason: one TOML file per group
# in scripts/mutation_equivalent/ (data, so groups can be worked on apart).  A name that no longer survives
# (or no longer exists after an edit) is reported as stale, so these lists cannot silently rot.
EQUIVALENT_DIR = ROOT / "scripts" / "mutation_equivalent"


def load_equivalent() -> dict[str, str]:
    import tomllib

    out: dict[str, str] = {}
    for path in sorted(EQUIVALENT_DIR.glob("*.toml")):
        with open(path, "rb") as f:
            out.update(tomllib.load(f))
    return out


EQUIVALENT = load_equivalent()


def _git_sha() -> str:
    try:
        git = dict(cwd=ROOT, capture_output=True, text=True, check=True)
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fewstep"], **git).stdout.strip()
        return sha + (" (fewstep/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_report(outcomes: list[Outcome], children: int) -> None:
    import mutmut

    detected = ("killed", "timeout")
    rows, total, total_det, total_eq = [], 0, 0, 0
    explained, unexplained = [], []
    for out in outcomes:
        for module, counts in out.counts.items():
            n = sum(counts.values())
            det = sum(counts.get(k, 0) for k in detected)
            eq = sum(1 for k in out.survivors if k.startswith(module[:-3].replace("/", ".") + ".")
                     and k in EQUIVALENT)
            total, total_det, total_eq = total + n, total_det + det, total_eq + eq
            score = f"{100 * det / n:.1f}%" if n else "-"
            rows.append(f"| `{module}` | {out.group} | {n} | {counts.get('killed', 0)} | "
                        f"{counts.get('timeout', 0)} | {counts.get('survived', 0)} | "
                        f"{n - det - counts.get('survived', 0)} | {eq} | {score} |")
        for key, diff in out.survivors.items():
            (explained if key in EQUIVALENT else unexplained).append((key, diff))
    seconds = sum(o.seconds for o in outcomes)
    cpu = sum(o.cpu_seconds for o in outcomes)
    score = 100 * total_det / total if total else 0.0
    score_eq = 100 * total_det / (total - total_eq) if total - total_eq else 0.0
    stale = sorted(set(EQUIVALENT) - {k for o in outcomes for k in o.survivors})
    lines = [
        "# Mutation testing",
        "",
        "`make mutate` (scripts/mutate.py) runs [mutmut](https://github.com/boxed/mutmut) over the",
        "modules where a silent numeric mistake costs users most, each group with only the tests that",
        "exercise it, and writes this file.  A mutant is a small change of the kind a careless edit makes (a",
        "flipped operator, a constant off by one, a dropped argument); it is *killed* when a test fails,",
        "*timed out* when the tests ran past mutmut's limit (also detected), and *survived* when every test",
        "passed.",
        "",
        f"- **Score: {score:.1f}%** of {total} mutants detected ({total_det}); "
        f"{score_eq:.1f}% leaving out the {total_eq} equivalent mutants listed below.",
        f"- Run time: {seconds / 60:.1f} min wall clock for all groups ({children} mutants at a time, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}), {cpu / 60:.1f} CPU-minutes: on {children} idle cores "
        f"about {cpu / 60 / children:.1f} min.",
        f"- Machine: {_machine()}; shared with other jobs while it ran (load average "
        f"{os.getloadavg()[1]:.1f} over the last 5 minutes of the run).",
        f"- mutmut {mutmut.__version__}, git {_git_sha()}.",
        "",
        "| module | group | mutants | killed | timed out | survived | no tests / other | equivalent "
        "| score |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "## Scope",
        "",
        SCOPE_TEXT,
        "",
        "| group | functions mutated | tests |",
        "|---|---|---|",
    ]
    for g in GROUPS:
        fns = "; ".join(f"`{m.rsplit('/', 1)[1]}`: " + ", ".join(chosen_functions(g, m)) for m in g.modules)
        tests = ", ".join(f"`{t}`" for t in g.tests)
        lines.append(f"| {g.name} | {fns} | {tests} |")
    lines += ["", "## Surviving mutants", ""]
    if not explained and not unexplained:
        lines.append("None.")
    for key, diff in unexplained:
        lines += [f"### `{key}`: not explained", "", "```diff", diff.strip(), "```", ""]
    for key, diff in explained:
        lines += [f"### `{key}`: equivalent", "", EQUIVALENT[key], "", "```diff", diff.strip(), "```", ""]
    if stale:
        lines += ["", "Listed as equivalent but no longer surviving: " + ", ".join(f"`{k}`" for k in stale)]
    REPORT.write_text("\n".join(lines).rstrip() + "\n")
    print(f"score {score:.1f}% ({total_det}/{total}), {len(unexplained)} survivors not explained; "
          f"wrote {REPORT.relative_to(ROOT)}")


SCOPE_TEXT = """\
Only functions are mutated: mutmut leaves module-level constants alone, and it skips decorated functions.
The solver entry points carry `@register(...)`; the script rewrites that to `f = register(...)(f)` in its
copy so their step loops can be mutated too.  Error-message lines (`raise ...(`, `warnings.warn(`) are not
mutated: a changed message is not a silent numeric mistake.  Left out on purpose:

- the `@triton.jit` kernel bodies: mutmut cannot mutate decorated functions, and a mutated kernel would
  have to be re-traced by the Triton interpreter for every mutant (seconds each); the launcher
  (`solver_update`) and the `*_ref` functions the kernels are tested against are in scope;
- options validation (`__post_init__`, `check_stage_inputs`, `Calibrator.__init__`) and NFE limits
  (`*_max_nfe`, `grids.py`'s step limits): a mistake there raises or refuses instead of computing a wrong
  number, and the error tests cover them;
- not yet in scope (a full run takes under 10 minutes on 2 shared cores, so more can be added): the FP8
  GEMM (`fp8_gemm.py`), `grids.py`, DPM singlestep (`dpmpp_2s`), DEIS's step loop (its weights,
  `logrho_weights`, are in), DDIM / Euler / Heun / LCM / TCD, the rest of `spacing.py`, the adapters'
  `__call__` wiring beyond the guidance helpers, and the Engine beyond its cache key (`plan_for`).  The step
  loops of DPM-Solver++ (multistep and SDE), UniPC, iPNDM and consistency sampling (`cm`) are in.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", action="append", choices=[g.name for g in GROUPS],
                    help="run only these groups (the report still covers every group with results)")
    ap.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    ap.add_argument("--module", action="append", help="mutate only these modules of the chosen groups")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    chosen = [g for g in GROUPS if not a.group or g.name in a.group]
    if a.module:
        chosen = [replace(g, modules=tuple(m for m in g.modules if m in a.module)) for g in chosen]
        chosen = [g for g in chosen if g.modules]
    if not a.report_only:
        for g in chosen:
            run_group(g, a.children)
    outcomes = [o for o in (load_outcome(g) for g in GROUPS) if o is not None]
    write_report(outcomes, a.children)


if __name__ == "__main__":
    main()
