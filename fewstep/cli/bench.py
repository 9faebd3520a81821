"""``fewstep bench``: the fused solver step and whole samples against diffusers, or (``--quant fp8``,
``int4``, ``w4a8``) the quantized layers; the benchmark functions live in :mod:`fewstep.bench`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

__all__ = ["add_arguments", "run"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", choices=("all", "step", "sample"), default="all")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on any device (CPU included): exercise every path, save nothing")
    parser.add_argument("--batch", type=_positive_int, nargs="+", default=[1, 8],
                        help="DiT sample batch sizes")
    parser.add_argument("--nfe", type=_positive_int, nargs="+", default=[4, 8], help="DiT sample NFEs")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--solver", default="dpmpp_2m", help="solver of the DiT sample")
    parser.add_argument("--compile-network", action="store_true",
                        help="also build a compile_network=True plan (minutes); reports its build time")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--quant", choices=("fp8", "int4", "w4a8"), default=None,
                        help="benchmark quantized layers instead: fp8 (GEMM, fused producer, DiT-XL/2 "
                             "forward, quality); int4 / w4a8 (on CUDA: the W4A16 GEMM vs cuBLAS bf16 / the "
                             "W4A8 GEMM vs the FP8 GEMM and the DiT-XL/2 forward vs FP8; on the CPU: INT4 "
                             "memory and per-layer quality)")
    parser.add_argument("--fp8-what", default="all",
                        choices=("all", "gemm", "producer", "forward", "quality"),
                        help="with --quant fp8: which part (`quality` also runs on the CPU, emulated)")
    parser.add_argument("--int4-what", default="all", choices=("all", "gemm", "forward", "quality"),
                        help="with --quant int4 / w4a8: which part (gemm and forward need CUDA; quality: "
                             "memory and per-layer SQNR, any device; all: gemm + forward + memory on CUDA, "
                             "quality on the CPU)")


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    save = device.type == "cuda" and not args.dry_run and not args.no_save
    if save:
        _check_writable(args.out)  # before minutes of benchmarks, not after
    if args.quant == "fp8":
        return _run_fp8(args, device, save)
    if args.quant in ("int4", "w4a8"):
        return _run_int4(args, device, save)
    from ..bench import (
        DIT_TINY,
        DIT_XL_2,
        STEP_CASES,
        STEP_SHAPES,
        bench_sample,
        bench_solver_step,
        copy_bandwidth,
        format_table,
        save_results,
    )

    dry = args.dry_run
    if device.type != "cuda" and not dry:
        raise ValueError("fewstep bench needs a CUDA GPU (use --dry-run to exercise it on the CPU)")
    steps, samples = [], []
    if args.what in ("all", "step"):
        shapes = ((3, 4, 8, 8),) if dry else STEP_SHAPES
        bw = None if dry else copy_bandwidth(device)
        for solver, opts in STEP_CASES:
            for shape in shapes:
                steps.append(bench_solver_step(solver, opts, shape, device, nfe=4 if dry else 8,
                                               bandwidth=bw))
    if args.what in ("all", "sample"):
        batches, nfes = ([1], [2]) if dry else (args.batch, args.nfe)
        for b in batches:
            for nfe in nfes:
                samples.append(bench_sample(
                    b, nfe, device, guidance_scale=args.guidance_scale, solver=args.solver,
                    dtype=torch.float32 if dry else torch.bfloat16, config=DIT_TINY if dry else DIT_XL_2,
                    compile_network=args.compile_network and not dry))
    print(format_table(steps, samples))
    if save:
        for kind, res in (("solver_step", steps), ("sample", samples)):
            if res:
                print(f"wrote {save_results(kind, res, device, args.out)}")
    return 0


def _run_fp8(args: argparse.Namespace, device: torch.device, save: bool) -> int:
    """``fewstep bench --quant fp8 [--fp8-what gemm|producer|forward|quality|all] [--dry-run]``."""
    from ..bench import DIT_TINY, save_results
    from ..bench.fp8 import (
        DIT_XL_2_GEMMS,
        GEMM_M,
        bench_dit_forward,
        bench_gemm,
        bench_producer,
        dit_xl_2_quality,
        format_fp8_table,
        sd15_unet_quality,
    )

    dry, what = args.dry_run, args.fp8_what
    if device.type != "cuda" and not dry and what != "quality":
        raise ValueError(
            "fewstep bench --quant fp8 times GPU kernels: it needs a CUDA GPU (use --dry-run to "
            "exercise it on the CPU, or `--fp8-what quality` to measure FP8 error with the emulation)"
        )
    gemms, producers, forwards, quality = [], [], [], []
    if what in ("all", "gemm"):
        shapes = ((48, 64, 96),) if dry else tuple((m, n, k) for m in GEMM_M for n, k in DIT_XL_2_GEMMS)
        gemms = [bench_gemm(m, n, k, device) for m, n, k in shapes]
    if what in ("all", "producer"):
        shapes = ((32, 64, 96),) if dry else tuple((m, 1152, n) for m in GEMM_M for n in (3456, 4608))
        producers = [bench_producer(m, d, n, device, tokens=16 if dry else 256) for m, d, n in shapes]
    if what in ("all", "forward"):
        forwards = [bench_dit_forward(2 if dry else 16, device, config=DIT_TINY if dry else None)]
    if what in ("all", "quality"):
        if dry:
            quality = dit_xl_2_quality(device, config=DIT_TINY)
        else:
            quality = dit_xl_2_quality(device) + sd15_unet_quality(device)
    print(format_fp8_table(gemms, producers, forwards, quality))
    if save:
        for kind, res in (("fp8_gemm", gemms), ("fp8_producer", producers), ("fp8_forward", forwards),
                          ("fp8_quality", quality)):
            if res:
                print(f"wrote {save_results(kind, res, device, args.out)}")
    return 0


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the results folder ({e.strerror or e})") from e
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_EXECUTE):
        raise ValueError(f"--out {out}: not a writable folder")


def _run_int4(args: argparse.Namespace, device: torch.device, save: bool) -> int:
    """``fewstep bench --quant int4|w4a8 [--int4-what gemm|forward|quality|all] [--dry-run]``.

    On CUDA: the quant's GEMM (W4A16 vs cuBLAS bf16 at M 1 .. 4096, or W4A8 vs the FP8 GEMM at M >= 4096) on
    DiT-XL/2 and Flux shapes, and the DiT-XL/2 batch-16 forward against FP8 (:mod:`fewstep.bench.int4_speed`),
    plus the INT4 memory table.  On the CPU: the memory table and the W4A16 per-layer SQNR on DiT-XL/2
    (round-to-nearest vs AWQ).  --dry-run: the memory table and every timing path on tiny shapes (on the CPU
    the GEMMs run under the interpreter, TRITON_INTERPRET=1, and the forward emulated)."""
    from ..bench import save_results
    from ..bench.int4 import dit_layer_sqnr, memory_table
    from ..bench.int4_speed import (
        DIT_INT4_TINY,
        INT4_GEMM_M,
        KERNEL_CASES,
        W4A8_GEMM_M,
        bench_int4_dit_forward,
        bench_int4_gemm,
        bench_w4a8_gemm,
        check_int4_kernels,
        format_int4_table,
        gemm_shapes,
    )
    from ..kernels.fp8_gemm import has_fp8_tensor_cores

    dry, what, quant = args.dry_run, args.int4_what, args.quant
    cuda = device.type == "cuda"
    if not cuda and not dry and what in ("gemm", "forward"):
        raise ValueError(
            f"fewstep bench --quant {quant} --int4-what {what} times GPU kernels: it needs a CUDA GPU (use "
            f"--dry-run to exercise it on the CPU, or `--int4-what quality` for memory and per-layer SQNR)"
        )
    timed = cuda or dry
    for r in memory_table():
        print(f"{r.model:12s} group {r.group_size:3d}: {r.layers} INT4 layers at {r.layer_ratio:.3f}x their "
              f"bf16 bytes; whole model {r.model_int4_bytes / 2**20:.0f} MiB = {r.model_ratio:.3f}x bf16")
    if what == "quality" or (what == "all" and not timed):
        for r in dit_layer_sqnr():
            print(f"{r.layer:40s} {str(r.shape):14s} RTN {r.rtn_db:6.2f} dB  AWQ {r.awq_db:6.2f} dB")
    gemms, forwards = [], []
    if timed and what in ("all", "gemm", "forward"):  # the kernels against their references before timing
        checks = check_int4_kernels(device, KERNEL_CASES[:1] if dry else KERNEL_CASES)
        print(f"INT4 kernels vs their references on {len(checks)} awkward shapes / epilogues: worst "
              f"{min(r.sqnr_vs_ref_db for r in checks):.1f} dB (floor 40)")
    if timed and what in ("all", "gemm"):
        if quant == "int4":
            cases = ((16, "tiny", 64, 128),) if dry else tuple(
                (m, model, n, k) for m in INT4_GEMM_M for model, n, k in gemm_shapes())
            gemms = [bench_int4_gemm(m, n, k, device, group_size=64 if dry else 128, model=model)
                     for m, model, n, k in cases]
        else:
            cases = ((48, "tiny", 64, 128),) if dry else tuple(
                (m, model, n, k) for m in W4A8_GEMM_M for model, n, k in gemm_shapes())
            gemms = [bench_w4a8_gemm(m, n, k, device, group_size=64 if dry else 128, model=model)
                     for m, model, n, k in cases]
    if timed and what in ("all", "forward") and cuda and not has_fp8_tensor_cores(device):
        print(f"--quant {quant}: the DiT-XL/2 forward is compared with FP8, which needs FP8 tensor cores "
              f"(sm_89+): left out on {torch.cuda.get_device_name(device)}")
    elif timed and what in ("all", "forward"):
        forwards = [bench_int4_dit_forward(
            2 if dry else 16, device, mode=quant, config=DIT_INT4_TINY if dry else None,
            group_size=32 if dry else 128, kernels=None if cuda else False)]
    table = format_int4_table(gemms if quant == "int4" else (), gemms if quant == "w4a8" else (), forwards)
    if table:
        print(table)
    if save:
        for kind, res in ((f"{quant}_gemm", gemms), (f"{quant}_forward", forwards)):
            if res:
                print(f"wrote {save_results(kind, res, device, args.out)}")
    return 0
