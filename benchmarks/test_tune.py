"""fs.tune against its targets; each part writes a Markdown report under benchmarks/results/.

* Gaussian-mixture oracle (VP epsilon model, d=4, K=3): held-out RMS error against the exact ODE endpoint,
  tuned grid vs the best fixed spacing for the same solver, NFE 4-6.  Target: >= 1.5x lower.
* Digits model (guidance 1.5): tuned NFE 4 / 6 vs the best fixed grid at NFE 6 / 8 (Frechet distance and
  class accuracy on 500 samples, 50 per digit, noise and labels not used for tuning); tuning time.

Run: ``python -m pytest benchmarks/test_tune.py -s`` (digits: set FEWSTEP_BENCH_DIGITS=1; minutes on a CPU),
or ``python benchmarks/test_tune.py gmm|digits``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fewstep as fs
from fewstep.solvers.gmm import GaussianMixture, point_of_time, program_error

RESULTS = Path(__file__).parent / "results"
FIXED = ("linspace", "leading", "trailing", "karras", "exponential", "beta", "ays")


def _machine() -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {load} (other work shared the cores), "
            f"git {sha}")


def gmm_report(solvers=("dpmpp_2m", "unipc"), nfes=(4, 5, 6)) -> str:
    spec = fs.ModelSpec(fs.schedules.DiscreteVP(beta_schedule="scaled_linear"))
    gmm = GaussianMixture.random(d=4, k=3, seed=0)

    def model(x, t, **cond):
        return gmm.output(x.double(), point_of_time(spec, float(t[0])), spec.prediction).to(x.dtype)

    calib = torch.randn(128, 4, generator=torch.Generator().manual_seed(1))
    fresh = torch.randn(512, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    cache: dict = {}

    def err(prog):  # exact ODE endpoints shared by programs with the same start and end
        return program_error(gmm, prog, fresh, cache)

    lines = ["| solver | NFE | best fixed spacing | its error | tuned error | ratio | tuning s | calls |",
             "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for solver in solvers:
        for nfe in nfes:
            fixed = []
            for sp in FIXED:
                try:
                    fixed.append((err(fs.solvers.build(solver, spec, nfe, sp)), sp))
                except ValueError:
                    continue
            best, best_sp = min(fixed)
            t0 = time.perf_counter()
            tu = fs.tune(model, spec, solver=solver, nfe=nfe, noise=calib, method="timesteps", verbose=False)
            secs = time.perf_counter() - t0
            e = err(tu.program)
            ratios.append(best / e)
            lines.append(f"| {solver} | {nfe} | {best_sp} | {best:.4g} | {e:.4g} | {best / e:.2f}x | "
                         f"{secs:.1f} | {tu.report['network_calls']} |")
    head = (f"# fs.tune on the Gaussian-mixture oracle\n\nVP scaled-linear schedule, epsilon model, mixture "
            f"d=4 K=3 (seed 0); tuned with method='timesteps', default budget, on 128 calibration noises "
            f"(25% held out by the guard); errors are RMS against the exact ODE endpoint (DOP853) on 512 "
            f"fresh noises.  Best fixed spacing: the lowest error among {', '.join(FIXED)}.\n\n"
            f"Machine: {_machine()}\n\n")
    return head + "\n".join(lines) + f"\n\nSmallest gain: {min(ratios):.2f}x (target >= 1.5x).\n"


def digits_report(nfes=(4, 6), fixed_solvers=("dpmpp_2m", "unipc"), n_cal=30, teacher_nfe=40,
                  budget=200) -> str:
    from fewstep.models import digits, metrics

    dit, _ = digits.load_digits_dit()
    model, spec = fs.models.from_diffusers(dit, digits.digits_scheduler_config())
    clf = metrics.load_digit_classifier()
    g = 1.5
    calib = torch.randn(n_cal, *digits.SAMPLE_SHAPE, generator=torch.Generator().manual_seed(123))
    calib_y = torch.arange(10).repeat(n_cal // 10 + 1)[:n_cal]
    ev_y = torch.arange(10).repeat_interleave(50)
    ev_x = torch.randn(500, *digits.SAMPLE_SHAPE, generator=torch.Generator().manual_seed(7))

    def score(prog):
        fn = lambda x, t: model(x.float(), torch.full((x.shape[0],), t), class_labels=ev_y).double()  # noqa: E731
        x = fs.solvers.run_reference(prog, fn, ev_x).float().clamp(-1, 1)
        return metrics.class_accuracy(x, ev_y, clf), metrics.frechet_distance(x, classifier=clf)

    rows = []
    for nfe in nfes:
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        tu = fs.tune(model, spec, solver="dpmpp_2m", nfe=nfe, noise=calib, cond={"class_labels": calib_y},
                     guidance_scale=g, method="timesteps", teacher_nfe=teacher_nfe, budget=budget)
        secs = time.perf_counter() - t0
        acc, fd = score(tu.program)
        rows.append(f"| tuned dpmpp_2m | {nfe} | {acc:.3f} | {fd:.2f} | {secs:.0f} s (load {load0:.1f}), "
                    f"{tu.report['network_calls']} calls, held-out {tu.report['holdout_before']:.4f} -> "
                    f"{tu.report['holdout_after']:.4f}, timesteps {tu.program.timesteps} |")
        print(rows[-1], file=sys.stderr, flush=True)
    for solver in fixed_solvers:
        for nfe in sorted(set(nfes) | {n + 2 for n in nfes}):
            acc, fd = score(fs.solvers.build(solver, spec, nfe, guidance_scale=g))
            rows.append(f"| {solver} (default grid) | {nfe} | {acc:.3f} | {fd:.2f} | |")
            print(rows[-1], file=sys.stderr, flush=True)
    head = (f"# fs.tune on the bundled digits model\n\nGuidance {g}; tuning on {n_cal} noises / labels (seed "
            f"123, 25% held out), teacher dpmpp_2m NFE {teacher_nfe}, budget {budget} calls; evaluation on "
            f"500 other noises (seed 7), 50 per digit, class accuracy by the bundled classifier and Frechet "
            f"distance to the 1,797 real digits (as the README table).\n\nMachine: {_machine()}\n\n"
            "| program | NFE | class acc | Frechet | tuning |\n|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


def _write(name: str, text: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"tune_{name}.md"
    path.write_text(text)
    return path


def test_gmm_targets():
    text = gmm_report()
    print(text, "\nwrote", _write("gmm", text))


@pytest.mark.skipif(os.environ.get("FEWSTEP_BENCH_DIGITS") != "1", reason="set FEWSTEP_BENCH_DIGITS=1")
def test_digits_targets():
    pytest.importorskip("diffusers")
    text = digits_report()
    print(text, "\nwrote", _write("digits", text))


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "gmm"
    text = gmm_report() if which == "gmm" else digits_report()
    print(text, "\nwrote", _write(which, text))
