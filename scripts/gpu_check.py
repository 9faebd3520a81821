"""``make gpu-check``: every GPU test, benchmark and tuning run of fewstep, offline, unattended, in one go.

On a CUDA machine it uses the Python, torch and Triton already installed (it never downloads anything):
installs fewstep with ``pip install --no-deps --no-build-isolation -e .`` and the pure-Python packages fewstep
needs from the wheel folder ``.whl/`` (filled by ``make wheels`` on a machine with registry access), prints
what it found, then runs these steps, each in a child process with its own time limit so one hang cannot eat
the rest:

1. ``tests``: the CUDA tests (CUDA-graph plans, FP8 and INT4 kernels and layers on the hardware);
2. ``bench``: the fused solver step against diffusers' ``scheduler.step`` and the whole DiT-XL/2 sample
   against diffusers' eager loop and the network alone in one graph;
3. ``fp8``: ``benchmarks/test_fp8.py`` (GEMM vs ``torch._scaled_mm`` and cuBLAS bf16, each output checked
   against ``_scaled_mm``; fused producer + GEMM; DiT-XL/2 batch-16 forward), as pytest-benchmark JSON;
4. ``int4``: the INT4 CUDA tests (``tests/quant/test_int4_plan.py``: INT4 / W4A8 plans and the Triton layers
   against their emulation on the device), then the GPU cases of ``benchmarks/test_int4.py`` (W4A16 vs cuBLAS
   bf16 on DiT-XL/2 and Flux shapes, W4A8 vs the FP8 GEMM, DiT-XL/2 batch-16 forward w4a8 vs fp8, every output
   checked), as pytest-benchmark JSON;
5. ``tune``: the FP8 GEMM launch configs timed per DiT-XL/2 layer with its real epilogue, recorded as data;
6. ``tune-dit``: ``fs.tune`` on DiT-XL/2 (random weights, bf16) with 16 calibration noises and class labels,
   unipc at NFE 8 with guidance, the default budget: wall time, network calls, held-out error before / after;
7. ``bench-compiled``: the DiT-XL/2 sample with ``compile_network=True``, with the time that is left.

Everything lands in one results folder (default ``benchmarks/results/<gpu>-<sha>/``): ``environment.json``,
one JSON per step, ``pytest-benchmark-fp8.json``, ``pytest-benchmark-int4.json``, ``summary.md`` (every
README target: measured value, target, pass/fail) and ``logs/``.  A re-run into the same folder overwrites
only files that gpu-check wrote there (listed in ``gpu-check-files.json``) and refuses to touch anything else.

Without a CUDA device the same steps run as a dry run (tiny shapes, CPU, the Triton interpreter), into a
temporary folder unless ``--out`` is given, and the script prints ``gpu-check: dry run (no CUDA device)``.

Usage: ``python scripts/gpu_check.py [--out DIR] [--budget SECONDS] [--dry-run] [--no-install] [--only STEP
...]`` (``--only int4``: the INT4 measurements alone; ``--only tune-dit``: the ``fs.tune`` timing alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
MANIFEST = "gpu-check-files.json"
INT4_ROWS = "int4-rows.jsonl"
# what `make wheels` downloads and the install step installs offline: fewstep's run-time dependencies that
# a GPU machine's Python may lack (never torch or triton: those are the machine's own)
WHEEL_REQUIREMENTS = ("diffusers", "safetensors", "pillow", "numpy", "scipy", "huggingface_hub", "filelock",
                      "fsspec", "packaging", "pyyaml", "regex", "requests", "tqdm", "importlib_metadata",
                      "typing_extensions", "pytest", "pytest-benchmark", "pytest-xdist")
# import name -> distribution, checked before anything runs
NEEDED = {"torch": "torch", "triton": "triton", "numpy": "numpy", "scipy": "scipy", "diffusers": "diffusers",
          "safetensors": "safetensors", "PIL": "pillow", "pytest": "pytest", "pytest_benchmark":
          "pytest-benchmark"}
# seconds: (time limit on a GPU, time limit in a dry run, least time left to start it on a GPU)
# (the budget counts from the start, install included; the default 540 s keeps the whole run under the
# 10 minutes one command may take on a lent GPU machine; compile_network goes last and gets what is left)
# int4, NOT YET MEASURED: tests/quant/test_int4_plan.py (31 s on the 2-core CPU), then 56 GEMM cases at ~1 s
# each (two medians, a config sweep at 20 ms, the FP8 configs tuned for W4A8), Triton compiles of 8 INT4
# configs (several M specializations each), the DiT-XL/2 forward 3 ways plus two emulated checks: about
# 150-200 s by that count; rows are kept as they come (INT4_ROWS), the longest sweep last
# tests: 140 -> 170 s for the INT4 kernel and layer tests, NOT YET MEASURED: about 15 Triton compiles (one per
# GEMM specialization they launch), 15-30 s by that count
# tune-dit, NOT YET MEASURED: the README target is fs.tune in <= 120 s; the limit adds building DiT-XL/2 on
# the device; it goes after the FP8 / INT4 measurements so that a slow tuning run costs only compile_network
STEPS = {
    "tests": (170, 120, 60),
    "bench": (100, 120, 40),
    "fp8": (140, 120, 60),
    "int4": (210, 120, 60),
    "tune": (45, 60, 20),
    "tune-dit": (150, 60, 60),
    "bench-compiled": (150, 60, 60),
}
DEFAULT_BUDGET = 540.0
# the CUDA tests: plans in graphs, every FP8 kernel and layer on the hardware (not the CPU-only suites)
# (tests/kernels/test_native.py is left out: it builds the optional C++/CUDA extension, minutes of nvcc)
CUDA_TESTS = ("tests/engine/test_plan_cuda.py", "tests/kernels/test_fp8_gemm.py",
              "tests/kernels/test_fp8_quantize.py", "tests/kernels/test_fp8_adaln_quant.py",
              "tests/kernels/test_solver_update.py", "tests/kernels/test_triton_support.py",
              "tests/quant/test_fp8_linear.py", "tests/quant/test_calibrate.py",
              "tests/quant/test_fp8_plan.py", "tests/kernels/test_int4_gemm.py",
              "tests/quant/test_int4_linear.py")
# a dry run checks that the step runs at all, in seconds: the CUDA-only module (it skips)
DRY_TESTS = ("tests/engine/test_plan_cuda.py",)
# the INT4 plan tests on the device (the `int4` step): INT4 / W4A8 plans and the Triton DiT vs its emulation
# (the INT4 kernel and layer tests are in CUDA_TESTS)
INT4_CUDA_TESTS = ("tests/quant/test_int4_plan.py",)
# DiT-XL/2 layers as (N, K, epilogue): the fused qkv and FF-in take bias (+ GELU for FF-in); attention out and
# FF out take bias + the gated adaLN-Zero residual
TUNE_LAYERS = ((3456, 1152, "bias"), (1152, 1152, "gated"), (4608, 1152, "bias_gelu"), (1152, 4608, "gated"))
TUNE_M = (512, 4096)
# fs.tune on DiT-XL/2 (the `tune-dit` step): calibration noises (with class labels), solver, NFE, guidance
TUNE_DIT = {"batch": 16, "solver": "unipc", "nfe": 8, "guidance_scale": 4.0}


class CheckError(RuntimeError):
    """A one-line reason gpu-check cannot go on."""


# -- the parent: environment, install, steps, summary ------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results/<gpu>-<sha>)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all steps together")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU even where CUDA is")
    p.add_argument("--no-install", action="store_true", help="skip the offline install of fewstep and wheels")
    p.add_argument("--only", nargs="+", choices=tuple(STEPS), help="run only these steps")
    p.add_argument("--step", choices=tuple(STEPS), help=argparse.SUPPRESS)  # a child process: one step
    args = p.parse_args(argv)
    if args.step:
        return _run_step(args.step, args.out, args.dry_run)
    try:
        return _check(args)
    except CheckError as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 1


def _check(args) -> int:
    t0 = time.monotonic()
    for mod in ("torch", "triton"):
        if not _has(mod):
            raise CheckError(f"{NEEDED[mod]} is not installed in {sys.executable}: gpu-check uses the "
                             f"machine's own torch and Triton (make gpu-check GPU_PYTHON=<its python>)")
    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    if dry:
        print("gpu-check: dry run (no CUDA device)" if not torch.cuda.is_available()
              else "gpu-check: dry run (--dry-run)")
    if not dry and not args.no_install:
        install_offline(WHEELS)
    env = environment(dry)
    for k in ("gpu", "driver", "python", "torch", "triton", "diffusers", "git_sha"):
        print(f"  {k:10s} {env.get(k)}")
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-")) if dry else
                       ROOT / "benchmarks" / "results" / f"{_slug(env['gpu'])}-{env['git_sha'][:12]}")
    writer = ResultsFolder(out)
    writer.write_text("environment.json", json.dumps(env, indent=2) + "\n")
    statuses = {}
    deadline = t0 + args.budget
    for name, (limit, dry_limit, least) in STEPS.items():
        if args.only and name not in args.only:
            continue
        left = deadline - time.monotonic()
        if dry and name == "bench-compiled":  # torch.compile of the network is CUDA-only: bench again
            statuses[name] = "skipped in a dry run (compile_network is CUDA-only; `bench` ran the rest)"
        elif not dry and left < least:
            statuses[name] = f"skipped: {left:.0f} s left of the budget, needs {least} s"
        if name in statuses:
            print(f"gpu-check: {name}: {statuses[name]}")
            continue
        timeout = dry_limit if dry else min(limit, max(left, 1.0))
        statuses[name] = run_step(name, writer, dry, timeout)
        print(f"gpu-check: {name}: {statuses[name]}")
    table = summary(writer.root, env, statuses, dry)
    writer.write_text("summary.md", table)
    writer.save_manifest()
    print(table)
    print(f"gpu-check: results in {writer.root} ({time.monotonic() - t0:.0f} s)")
    return 0 if dry or not any(s.startswith(("FAILED", "TIMEOUT")) for s in statuses.values()) else 1


def install_offline(wheels: Path) -> None:
    """fewstep (editable, no dependencies, no build isolation) and the missing pure-Python dependencies from
    ``wheels``, never from an index."""
    missing = [dist for mod, dist in NEEDED.items() if mod not in ("torch", "triton") and not _has(mod)]
    if missing:
        pip_install_offline(missing, wheels)
    env = dict(os.environ, FEWSTEP_SKIP_CUDA_BUILD=os.environ.get("FEWSTEP_SKIP_CUDA_BUILD", "1"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-build-isolation", "-e", str(ROOT)], capture_output=True, text=True, timeout=300,
                       env=env)
    if r.returncode:
        raise CheckError(f"pip install -e . failed: {_last_line(r.stderr)}")
    importlib.invalidate_caches()


def pip_install_offline(packages: list[str], wheels: Path, extra: tuple[str, ...] = ()) -> None:
    """``pip install --no-index --find-links wheels packages`` (never an index); a CheckError if it fails."""
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        raise CheckError(f"missing {', '.join(packages)} and no wheels in {wheels}: run `make wheels` on a "
                         f"machine with registry access and bring the folder along")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), *extra,
           *packages]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise CheckError(f"offline install of {packages} from {wheels} failed: {_last_line(r.stderr)}")


def environment(dry: bool) -> dict:
    """GPU, driver, Python and package versions, git SHA; a CheckError naming the first thing missing."""
    for mod, dist in NEEDED.items():
        if not _has(mod):
            raise CheckError(f"{dist} is not installed in {sys.executable} (torch and triton must come with "
                             f"the machine; the others from `make wheels`)")
    import diffusers
    import torch
    import triton

    gpu = torch.cuda.get_device_name() if not dry else (platform.processor() or "cpu")
    cc = ".".join(map(str, torch.cuda.get_device_capability())) if not dry else None
    driver = None
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        driver = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    if not dry and driver is None:
        raise CheckError("nvidia-smi did not report a driver version")
    return {"gpu": gpu, "compute_capability": cc, "driver": driver, "cuda": torch.version.cuda,
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "diffusers": diffusers.__version__, "git_sha": _git_sha(), "dry_run": dry,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class ResultsFolder:
    """Writes files into one folder; a file already there that an earlier gpu-check did not write (by its
    manifest) is never overwritten."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        m = self.root / MANIFEST
        self.ours = set(json.loads(m.read_text())) if m.is_file() else set()
        self.written: set[str] = set()

    def path(self, rel: str) -> Path:
        p = self.root / rel
        if p.exists() and rel not in self.ours and rel not in self.written:
            raise CheckError(f"{p} exists and was not written by gpu-check: refusing to overwrite it "
                             f"(pass another --out)")
        self.written.add(rel)
        return p

    def write_text(self, rel: str, text: str) -> None:
        self.path(rel).write_text(text)

    def save_manifest(self) -> None:
        (self.root / MANIFEST).write_text(json.dumps(sorted(self.ours | self.written), indent=1) + "\n")


def run_step(name: str, writer: ResultsFolder, dry: bool, timeout: float) -> str:
    """Run one step in a child process (its own time limit); its output goes to logs/<name>.log."""
    log = writer.path(f"logs/{name}.log")
    if name in ("tests", "fp8", "int4"):
        writer.path(f"tests-{name}.xml")
    if name in ("fp8", "int4"):
        writer.path(f"pytest-benchmark-{name}.json")
    if name == "int4":
        writer.path("tests-int4-cuda.xml")
        rows = writer.path(INT4_ROWS)
        rows.unlink(missing_ok=True)  # appended to row by row: a re-run starts empty
    writer.path(f"{name}.json").unlink(missing_ok=True)  # a step that times out leaves none, not an old one
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(writer.root)]
    if dry:
        cmd.append("--dry-run")
    env = dict(os.environ)
    if dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    t = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return f"TIMEOUT after {timeout:.0f} s (log: logs/{name}.log)"
    took = time.monotonic() - t
    if rc:
        return f"FAILED (exit {rc}, {took:.0f} s; log: logs/{name}.log: {_last_line(log.read_text())})"
    return f"ok ({took:.0f} s)"


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group (start_new_session), nothing else
    except ProcessLookupError:
        pass
    proc.wait()


# -- the children: one step each ---------------------------------------------------------------------------
def _run_step(name: str, out: Path, dry: bool) -> int:
    import torch

    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    return {"tests": _step_tests, "bench": _step_bench, "bench-compiled": _step_bench_compiled,
            "fp8": _step_fp8, "int4": _step_int4, "tune": _step_tune, "tune-dit": _step_tune_dit}[name](
        out, device, dry)


def _pytest(out: Path, tag: str, paths, extra=()) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--junitxml={out}/tests-{tag}.xml", *extra, *paths]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def _step_tests(out: Path, device, dry: bool) -> int:
    rc = _pytest(out, "tests", DRY_TESTS if dry else CUDA_TESTS, ("-x",) if dry else ())
    _dump(out / "tests.json", {"exit_code": rc, "junit": "tests-tests.xml"})
    return rc


def _step_bench(out: Path, device, dry: bool) -> int:
    return _bench(out / "bench.json", device, dry, compile_network=False)


def _step_bench_compiled(out: Path, device, dry: bool) -> int:
    return _bench(out / "bench-compiled.json", device, dry, compile_network=True)


def _bench(path: Path, device, dry: bool, *, compile_network: bool) -> int:
    import torch

    from fewstep.bench import (
        DIT_TINY,
        DIT_XL_2,
        STEP_CASES,
        STEP_SHAPES,
        bench_sample,
        bench_solver_step,
        copy_bandwidth,
    )

    steps, samples = [], []
    if not compile_network:
        bw = None if dry else copy_bandwidth(device)
        for solver, opts in STEP_CASES[:1] if dry else STEP_CASES:
            for shape in ((3, 4, 8, 8),) if dry else STEP_SHAPES:
                steps.append(bench_solver_step(solver, opts, shape, device, nfe=4 if dry else 8,
                                               bandwidth=bw))
                print(steps[-1], flush=True)
    cases = ((1, 2),) if dry else (((8, 8),) if compile_network else ((1, 8), (8, 4), (8, 8)))
    for batch, nfe in cases:
        samples.append(bench_sample(batch, nfe, device, solver="dpmpp_2m", guidance_scale=4.0,
                                    dtype=torch.float32 if dry else torch.bfloat16,
                                    config=DIT_TINY if dry else DIT_XL_2,
                                    compile_network=compile_network and not dry))
        print(samples[-1], flush=True)
    _dump(path, {"solver_step": [_row(r) for r in steps], "sample": [_row(r) for r in samples]})
    return 0


def _step_fp8(out: Path, device, dry: bool) -> int:
    if dry:  # the benchmark module skips without FP8 tensor cores: exercise the same functions, tiny
        from fewstep.bench import DIT_TINY
        from fewstep.bench.fp8 import bench_dit_forward, bench_gemm, bench_producer

        rows = {"fp8_gemm": [_row(bench_gemm(48, 64, 96, device))],
                "fp8_producer": [_row(bench_producer(32, 64, 96, device, tokens=16))],
                "fp8_forward": [_row(bench_dit_forward(2, device, config=DIT_TINY))]}
        _dump(out / "fp8.json", rows)
        return 0
    env = dict(os.environ, FEWSTEP_RESULTS_DIR=str(out))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_fp8.py",
           f"--junitxml={out}/tests-fp8.xml", f"--benchmark-json={out}/pytest-benchmark-fp8.json"]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    bench_json = out / "pytest-benchmark-fp8.json"
    rows: dict[str, list] = {"fp8_gemm": [], "fp8_producer": [], "fp8_forward": []}
    if bench_json.is_file():
        for b in json.loads(bench_json.read_text()).get("benchmarks", []):
            kind = ("fp8_gemm" if "test_fp8_gemm" in b["name"] else
                    "fp8_producer" if "producer" in b["name"] else "fp8_forward")
            rows[kind].append(b.get("extra_info", {}))
    _dump(out / "fp8.json", dict(rows, exit_code=rc))
    return rc


# the kinds of row benchmarks/test_int4.py's GPU tests append to INT4_ROWS (FEWSTEP_INT4_ROWS), one JSON
# object a line, as each case finishes: a time-out keeps what was measured (summary() reads the file then)
INT4_KINDS = ("int4_kernels", "int4_gemm", "w4a8_gemm", "w4a8_forward")


def _step_int4(out: Path, device, dry: bool) -> int:
    if dry:  # the GPU cases skip without CUDA: the same functions, tiny, the GEMMs under the interpreter
        from fewstep.bench.int4_speed import (
            DIT_INT4_TINY,
            KERNEL_CASES,
            bench_int4_dit_forward,
            bench_int4_gemm,
            bench_w4a8_gemm,
            check_int4_kernels,
        )

        rows = {"int4_kernels": [_row(r) for r in check_int4_kernels(device, KERNEL_CASES[:1])],
                "int4_gemm": [_row(bench_int4_gemm(16, 64, 128, device, group_size=64, model="tiny"))],
                "w4a8_gemm": [_row(bench_w4a8_gemm(48, 64, 128, device, group_size=64, model="tiny"))],
                "w4a8_forward": [_row(bench_int4_dit_forward(2, device, config=DIT_INT4_TINY, group_size=32,
                                                             kernels=False))]}
        _dump(out / "int4.json", rows)
        return 0
    tests_rc = _pytest(out, "int4-cuda", INT4_CUDA_TESTS)
    env = dict(os.environ, FEWSTEP_RESULTS_DIR=str(out), FEWSTEP_INT4_ROWS=str(out / INT4_ROWS))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           "benchmarks/test_int4.py", f"--junitxml={out}/tests-int4.xml",
           f"--benchmark-json={out}/pytest-benchmark-int4.json"]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    _dump(out / "int4.json", dict(int4_rows(out / INT4_ROWS), exit_code=rc, tests_exit_code=tests_rc))
    return rc or tests_rc


def int4_rows(path: Path) -> dict[str, list]:
    """The rows benchmarks/test_int4.py's GPU tests appended to ``path`` (JSON lines), by kind."""
    rows: dict[str, list] = {kind: [] for kind in INT4_KINDS}
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        if row.get("kind") in rows:
            rows[row.pop("kind")].append(row)
    return rows


def _step_tune(out: Path, device, dry: bool) -> int:
    """Time every candidate launch config per DiT-XL/2 layer with the epilogue it runs in the network."""
    from fewstep.kernels.fp8_gemm import heuristic_config, resolve_config

    rows = []
    for m in (32,) if dry else TUNE_M:
        for n, k, epilogue in ((64, 96, "bias_gelu"),) if dry else TUNE_LAYERS:
            t = time.perf_counter()
            cfg = resolve_config(m, n, k, device, tune=not dry, epilogue=epilogue)
            rows.append({"m": m, "n": n, "k": k, "epilogue": epilogue, "config": cfg.to_dict(),
                         "heuristic": heuristic_config(m, n, k, device if not dry else None,
                                                       epilogue=epilogue).to_dict(),
                         "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
    _dump(out / "tune.json", {"fp8_gemm_configs": rows})
    return 0


def _step_tune_dit(out: Path, device, dry: bool) -> int:
    """``fs.tune`` on DiT-XL/2 with random weights in bf16 (a dry run: the tiny DiT in fp32 on the CPU, a
    short teacher and budget): wall time, network calls, held-out error before / after."""
    import torch

    import fewstep as fs
    from fewstep.bench import DIT_TINY, DIT_XL_2
    from fewstep.bench.sample import build_dit, dit_fn, dit_spec

    config = DIT_TINY if dry else DIT_XL_2
    t = time.perf_counter()
    dit = build_dit(config, device, torch.float32 if dry else torch.bfloat16)
    build_s = time.perf_counter() - t
    c, s, batch = config["in_channels"], config["sample_size"], TUNE_DIT["batch"]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, c, s, s, generator=g).to(device)
    labels = torch.randint(0, config["num_embeds_ada_norm"], (batch,), generator=g).to(device)
    short = {"budget": 64, "teacher_nfe": 20} if dry else {}  # the search's code paths in seconds
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    tuned = fs.tune(dit_fn(dit), dit_spec(), solver=TUNE_DIT["solver"], nfe=TUNE_DIT["nfe"], noise=noise,
                    cond={"class_labels": labels}, guidance_scale=TUNE_DIT["guidance_scale"], **short)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    r = tuned.report
    row = {"model": "DiT (tiny)" if dry else "DiT-XL/2", **TUNE_DIT,
           "dtype": "float32" if dry else "bfloat16", "method": tuned.method, "budget": r.get("budget"),
           "teacher": r.get("teacher"),
           "calibration_samples": r.get("calibration_samples"), "holdout_samples": r.get("holdout_samples"),
           "wall_s": wall, "tune_seconds": r.get("seconds"), "build_s": build_s,
           "network_calls": r.get("network_calls"), "holdout_before": r.get("holdout_before"),
           "holdout_after": r.get("holdout_after"), "improved": tuned.improved,
           "timesteps_before": r.get("timesteps_before"), "timesteps_after": r.get("timesteps_after"),
           "summary": tuned.summary(), "load_average": os.getloadavg()}
    print(row, flush=True)
    _dump(out / "tune-dit.json", {"fs_tune": [row]})
    return 0


def _row(r) -> dict:
    d = dataclasses.asdict(r)
    for p in ("speedup", "overhead_ratio", "step_overhead_us", "vs_scaled_mm", "vs_bf16", "tflops", "ratio",
              "target", "weight_gbps"):
        if hasattr(type(r), p):
            d[p] = getattr(r, p)
    return d


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


# -- the table of README targets ---------------------------------------------------------------------------
def targets(results: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, measured, target, passed) for every README target, from the steps' JSON (missing: None)."""
    rows = []
    bench = results.get("bench") or {}
    for r in bench.get("solver_step", []):
        if tuple(r["shape"]) == (8, 4, 32, 32):
            rows.append((f"solver update per step, {r['solver']} 8x4x32x32 (us)", r["fused_us"], "<= 5",
                         r["fused_us"] <= 5.0))
    for r in bench.get("sample", []):
        rows.append((f"plan / network calls in one graph, DiT-XL/2 b{r['batch']} NFE {r['nfe']}",
                     r["overhead_ratio"], "<= 1.03", r["overhead_ratio"] <= 1.03))
    for r in (results.get("bench-compiled") or {}).get("sample", []):
        ms = r.get("compiled_plan_ms")
        rows.append((f"compile_network plan, DiT-XL/2 b{r['batch']} NFE {r['nfe']} (ms)", ms, "<= 80",
                     None if ms is None else ms <= 80.0))
    fp8 = results.get("fp8") or {}
    for r in fp8.get("fp8_gemm", []):
        v = r.get("vs_scaled_mm")
        rows.append((f"fp8_gemm vs _scaled_mm, {r['m']}x{r['n']}x{r['k']} (x)", v, ">= 0.9",
                     None if v is None else v >= 0.9))
        if r.get("sqnr_vs_scaled_mm_db") is not None:
            s = r["sqnr_vs_scaled_mm_db"]
            rows.append((f"fp8_gemm output vs _scaled_mm, {r['m']}x{r['n']}x{r['k']} (dB)", s, ">= 40",
                         s >= 40))
    for r in fp8.get("fp8_producer", []):
        if r["m"] >= 4096:
            rows.append((f"fused producer + GEMM vs bf16, {r['m']}x{r['d']}->{r['n']} (x)", r["speedup"],
                         ">= 1.25", r["speedup"] >= 1.25))
    for r in fp8.get("fp8_forward", []):
        if r["batch"] == 16:
            rows.append(("FP8 DiT-XL/2 forward, batch 16 (ms)", r["fp8_ms"], "<= 6.7", r["fp8_ms"] <= 6.7))
    rows += int4_targets(results.get("int4") or {})
    for r in (results.get("tune-dit") or {}).get("fs_tune", []):
        if r["model"] == "DiT-XL/2" and r["batch"] == 16:
            rows.append(("fs.tune DiT-XL/2 batch 16 (s)", r["wall_s"], "<= 120", r["wall_s"] <= 120.0))
    return rows


def int4_targets(int4: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """Issue 13's INT4 speed targets from the ``int4`` step's JSON, and the worst checked output per kind."""
    rows = []
    for r in int4.get("int4_gemm", []):
        goal = 1.5 if r["m"] <= 64 else 0.9 if r["m"] >= 2048 else None
        if goal is not None:
            v = r["bf16_us"] / r["int4_us"]
            rows.append((f"int4_gemm (W4A16) vs cuBLAS bf16, {r['model']} {r['m']}x{r['n']}x{r['k']} (x)", v,
                         f">= {goal}", v >= goal))
    for r in int4.get("w4a8_gemm", []):
        if r["m"] >= 4096:
            v = r["fp8_us"] / r["w4a8_us"]
            rows.append((f"w4a8_gemm vs fewstep fp8_gemm, {r['model']} {r['m']}x{r['n']}x{r['k']} (x)", v,
                         ">= 0.9", v >= 0.9))
    for kind, what in (("int4_kernels", "INT4 GEMMs on awkward shapes and epilogues vs their _ref"),
                       ("int4_gemm", "int4_gemm output vs int4_gemm_ref"),
                       ("w4a8_gemm", "w4a8_gemm output vs w4a8_gemm_ref")):
        if int4.get(kind):
            worst = min(r["sqnr_vs_ref_db"] for r in int4[kind])
            rows.append((f"{what}, worst of {len(int4[kind])} (dB)", worst, ">= 40", worst >= 40))
    for r in int4.get("w4a8_forward", []):
        if r["batch"] == 16:
            v = r["int4_ms"] / r["fp8_ms"]
            rows.append(("W4A8 / FP8 DiT-XL/2 forward time, batch 16 (x)", v, "<= 1.1", v <= 1.1))
            d = r["int4_sqnr_db"] - r["int4_emulated_sqnr_db"]
            rows.append(("W4A8 DiT-XL/2 forward SQNR minus its emulation's (dB)", d, ">= -1", d >= -1.0))
    return rows


def summary(root: Path, env: dict, statuses: dict, dry: bool) -> str:
    results = {}
    for name in STEPS:
        p = root / f"{name}.json"
        if p.is_file() and name in statuses:
            results[name] = json.loads(p.read_text())
        elif name == "int4" and name in statuses and (root / INT4_ROWS).is_file():  # timed out: rows so far
            results[name] = int4_rows(root / INT4_ROWS)
    lines = [f"# gpu-check {env['git_sha'][:12]} on {env['gpu']}", "",
             f"driver {env['driver']}, CUDA {env['cuda']}, Python {env['python']}, torch {env['torch']}, "
             f"triton {env['triton']}, diffusers {env['diffusers']}, {env['time']}", ""]
    if dry:
        lines += ["**Dry run** (no CUDA device): tiny shapes on the CPU; no measured value below is a target "
                  "check.", ""]
    lines += ["| step | status |", "|---|---|"] + [f"| {k} | {v} |" for k, v in statuses.items()] + [""]
    lines += ["| target | measured | target | pass |", "|---|---|---|---|"]
    rows = [] if dry else targets(results)
    for what, value, goal, ok in rows:
        shown = "not measured" if value is None else f"{value:.3g}"
        lines.append(f"| {what} | {shown} | {goal} | {'-' if ok is None else 'pass' if ok else 'FAIL'} |")
    if not rows:
        lines.append("| (no GPU measurement in this run) | - | - | - |")
    return "\n".join(lines) + "\n"


# -- small helpers -----------------------------------------------------------------------------------------
def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _git_sha() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=ROOT)
        return r.stdout.strip() or "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower() or "gpu"


def _last_line(text: str) -> str:
    lines = [x for x in (text or "").strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


if __name__ == "__main__":
    sys.exit(main())
