"""The ``fewstep`` command: ``fewstep demo | sample | bench | accuracy | solvers``.

Each subcommand lives in its own module of this package exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``fewstep --help`` stays
fast and GPU-only code is never imported on a CPU machine.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": (
        "fewstep.cli.demo",
        "sample a 10x10 grid of digits with the bundled model and print quality/latency",
    ),
    "sample": ("fewstep.cli.sample", "sample images with the bundled model or a local diffusers model"),
    "bench": ("fewstep.cli.bench", "latency benchmarks: fused solver step and whole samples vs diffusers"),
    "accuracy": ("fewstep.cli.accuracy", "RMS error of every deterministic solver vs an exact ODE oracle"),
    "solvers": ("fewstep.cli.solvers", "list the registered solvers, their options, diffusers equivalents"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="fewstep", description="fewstep: a low-NFE diffusion inference engine"
    )
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        if not _available(module):
            continue
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"fewstep {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
