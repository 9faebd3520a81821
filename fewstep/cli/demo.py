"""``fewstep demo``: the bundled digits DiT, compiled into plans, sampled and measured.

Builds a plan for the bundled class-conditional DiT (trained by ``scripts/train_digits.py`` on
scikit-learn's digits, which ship as an array file), samples a 10x10 grid (one row per digit) into
``demo.png``, then prints a table per solver and NFE: latency of one plan call, class accuracy of the samples
(the bundled classifier) and the Frechet distance to the real digits in the classifier's feature space.  On
a machine without CUDA the plans run eagerly through the kernels' PyTorch references; on CUDA each plan is
one CUDA-graph replay.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from . import one_line
from .checks import device as check_device
from .checks import guidance_arg, guidance_or_none, int_at_least, positive_int_arg, writable_file

DEFAULT_SOLVERS = ("euler", "ddim", "dpmpp_2m", "unipc")
DEFAULT_NFES = (4, 8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo.png", help="where to write the 10x10 grid (default: demo.png)")
    p.add_argument("--solver", default="unipc", help="solver for the grid (default: unipc)")
    p.add_argument("--nfe", type=positive_int_arg, default=8, help="network calls for the grid (default: 8)")
    p.add_argument(
        "--guidance",
        type=guidance_arg,
        default=1.5,
        help="classifier-free guidance scale, >= 0; 0: off (default: 1.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument(
        "--solvers",
        default=",".join(DEFAULT_SOLVERS),
        help=f"comma-separated solvers for the table (default: {','.join(DEFAULT_SOLVERS)})",
    )
    p.add_argument(
        "--nfes",
        default=",".join(map(str, DEFAULT_NFES)),
        help=f"comma-separated NFEs for the table (default: {','.join(map(str, DEFAULT_NFES))})",
    )
    p.add_argument(
        "--per-class",
        type=int_at_least(2),
        default=30,
        help="samples per digit for the metrics, >= 2 (default: 30)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument(
        "--repeats", type=positive_int_arg, default=3, help="timed plan calls per row (default: 3)"
    )


def _parse_list(text: str, kind, what: str) -> list:
    try:
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"--{what}: expected a comma-separated list, got {text!r}") from e
    if not items:
        raise ValueError(f"--{what}: empty list")
    return items


def _check_nfes(nfes: list[int]) -> list[int]:
    bad = [n for n in nfes if n < 1]
    if bad:
        raise ValueError(f"--nfes: every NFE must be >= 1, got {bad}")
    return nfes


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _programs_check(build, spec, solver: str, nfe: int, solvers: list[str], nfes: list[int],
                    guidance) -> dict[tuple[str, int], str]:
    """Build every program the demo will use (milliseconds, no network): the grid's must build; a table cell
    a solver cannot do (heun: odd NFE only) becomes a '-' row, returned as {(solver, nfe): reason}, but an NFE
    no solver of the table can do is an error."""
    build(solver, spec, nfe, guidance_scale=guidance)
    cannot = {}
    for s in solvers:
        for n in nfes:
            try:
                build(s, spec, n, guidance_scale=guidance)
            except ValueError as e:
                cannot[s, n] = one_line(str(e).split(";")[0])
    for n in nfes:
        if all((s, n) in cannot for s in solvers):
            raise ValueError(f"--nfes: no solver of the table can take NFE {n}: {cannot[solvers[0], n]}")
    return cannot


def run(args: argparse.Namespace) -> int:
    import torch

    import fewstep as fs
    from fewstep.cli.images import image_grid, save_png
    from fewstep.models import digits, metrics

    # every argument is checked here, before any work
    solvers = _parse_list(args.solvers, str, "solvers")
    nfes = _check_nfes(_parse_list(args.nfes, int, "nfes"))
    for name in solvers + [args.solver]:
        fs.solvers.get(name)  # unknown names fail here
    device = check_device(args.device)
    writable_file(args.out, "--out", suffixes=(".png",))
    guidance = guidance_or_none(args.guidance)
    cannot = _programs_check(fs.solvers.build, digits.digits_spec(), args.solver, args.nfe, solvers, nfes,
                             guidance)
    t_start = time.perf_counter()

    _progress("[1/3] loading the bundled digits DiT and classifier")
    dit, config = digits.load_digits_dit()
    model, spec = fs.models.from_diffusers(dit.to(device), digits.digits_scheduler_config())
    clf = metrics.load_digit_classifier()
    n_params = sum(p.numel() for p in dit.parameters())
    mode = "one CUDA graph per sample" if device.type == "cuda" else "eager, PyTorch reference kernels"
    print(
        f"fewstep demo: digits DiT ({n_params / 1e6:.2f} M parameters, {spec.describe()}), "
        f"guidance {args.guidance:g}, {device.type} ({mode})"
    )

    def make_plan(solver: str, nfe: int, labels: torch.Tensor):
        return fs.compile(
            model,
            spec,
            solver=solver,
            nfe=nfe,
            shape=(labels.numel(), *digits.SAMPLE_SHAPE),
            guidance_scale=guidance,
            device=device,
            cond={"class_labels": labels},
        )

    def noise_for(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, *digits.SAMPLE_SHAPE, generator=g).to(device)

    _progress(f"[2/3] sampling the 10x10 grid with {args.solver}, NFE {args.nfe}")
    labels = torch.arange(10).repeat_interleave(10).to(device)
    plan = make_plan(args.solver, args.nfe, labels)
    grid = plan(noise_for(100, args.seed), class_labels=labels, seed=args.seed).clamp(-1, 1).cpu()
    save_png(args.out, image_grid(grid[:, 0].numpy(), rows=10, scale=4))
    print(f"wrote {args.out}: a row per digit 0-9 ({args.solver}, NFE {args.nfe})")

    rows = []
    combos = [(s, n) for s in solvers for n in nfes]
    labels = torch.arange(10).repeat_interleave(args.per_class).to(device)
    for k, (solver, nfe) in enumerate(combos, 1):
        _progress(f"[3/3] table {k}/{len(combos)}: {solver} NFE {nfe}")
        if (solver, nfe) in cannot:
            rows.append((solver, nfe, None, None, None, cannot[solver, nfe]))
            continue
        plan = make_plan(solver, nfe, labels)
        noise = noise_for(labels.numel(), args.seed + 1)
        x = plan(noise, class_labels=labels, seed=args.seed)  # warm
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = plan(noise, class_labels=labels, seed=args.seed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        x = x.clamp(-1, 1).cpu()
        acc = metrics.class_accuracy(x, labels.cpu(), clf)
        fd = metrics.frechet_distance(x, classifier=clf)
        rows.append((solver, nfe, statistics.median(times) * 1e3, acc, fd, ""))

    n = labels.numel()
    print(
        f"\n{n} samples per row ({args.per_class} per digit), guidance {args.guidance:g}, seed {args.seed}; "
        f"latency = median of {args.repeats} plan calls on {_device_name(device)}"
    )
    print(f"{'solver':<12} {'NFE':>4} {'latency ms':>11} {'class acc':>10} {'Frechet dist':>13}")
    for solver, nfe, ms, acc, fd, note in rows:
        if ms is None:
            print(f"{solver:<12} {nfe:>4} {'-':>11} {'-':>10} {'-':>13}  ({note})")
        else:
            print(f"{solver:<12} {nfe:>4} {ms:>11.1f} {acc:>10.3f} {fd:>13.2f}")
    real_x, real_y = digits.load_digits_data("test")
    print(
        f"{'real digits':<12} {'':>4} {'':>11} {metrics.class_accuracy(real_x, real_y, clf):>10.3f} "
        f"{metrics.frechet_distance(real_x, classifier=clf):>13.2f}  (held-out test split)"
    )
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")
    return 0


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
