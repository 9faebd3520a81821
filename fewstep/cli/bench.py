"""``fewstep bench``: the fused solver step and whole samples against diffusers (``fewstep.bench``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..bench.results import save_results
from ..bench.sample import (
    DIT_TINY,
    DIT_XL_2,
    STEP_CASES,
    STEP_SHAPES,
    bench_sample,
    bench_solver_step,
    format_table,
)
from ..bench.timing import copy_bandwidth

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", choices=("all", "step", "sample"), default="all")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on any device (CPU included): exercise every path, save nothing")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="DiT sample batch sizes")
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 8], help="DiT sample NFEs")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--solver", default="dpmpp_2m", help="solver of the DiT sample")
    parser.add_argument("--compile-network", action="store_true",
                        help="also build a compile_network=True plan (minutes); reports its build time")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--quant", choices=("fp8",), default=None,
                        help="benchmark FP8 layers instead (GEMM, fused producer, DiT-XL/2 forward, quality)")
    parser.add_argument("--fp8-what", default="all",
                        choices=("all", "gemm", "producer", "forward", "quality"),
                        help="with --quant fp8: which part (`quality` also runs on the CPU, emulated)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "quant", None) == "fp8":
        from ..bench.fp8 import run_quant

        return run_quant(args)
    dry = args.dry_run
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not dry:
        raise ValueError("fewstep bench needs a CUDA GPU (use --dry-run to exercise it on the CPU)")
    steps, samples = [], []
    if args.what in ("all", "step"):
        shapes = ((3, 4, 8, 8),) if dry else STEP_SHAPES
        bw = None if dry else copy_bandwidth(device)
        for solver, opts in STEP_CASES:
            for shape in shapes:
                steps.append(bench_solver_step(solver, opts, shape, device, nfe=4 if dry else 8,
                                               iters=3 if dry else 50, bandwidth=bw))
    if args.what in ("all", "sample"):
        batches, nfes = ([1], [2]) if dry else (args.batch, args.nfe)
        for b in batches:
            for nfe in nfes:
                samples.append(bench_sample(
                    b, nfe, device, guidance_scale=args.guidance_scale, solver=args.solver,
                    dtype=torch.float32 if dry else torch.bfloat16, config=DIT_TINY if dry else DIT_XL_2,
                    compile_network=args.compile_network and not dry, iters=2 if dry else 10))
    print(format_table(steps, samples))
    if not dry and not args.no_save:
        for kind, res in (("solver_step", steps), ("sample", samples)):
            if res:
                print(f"wrote {save_results(kind, res, device, args.out)}")
    return 0
