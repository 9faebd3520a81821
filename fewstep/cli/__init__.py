"""The ``fewstep`` command: ``fewstep demo | sample | bench | accuracy | solvers``.

Each subcommand lives in its own module of this package exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``fewstep --help`` stays
fast and GPU-only code is never imported on a CPU machine.

Every error ends the command with one line on stderr, ``fewstep <command>: error: <message>``, and a non-zero
exit status, never a traceback: :func:`main` catches whatever a subcommand raises (``FEWSTEP_DEBUG=1``
re-raises it instead, for developers), and the argument parser's own errors are one line too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

DEBUG_ENV = "FEWSTEP_DEBUG"
MAX_MESSAGE = 2000  # characters of an error message printed (state-dict mismatches can list hundreds of keys)
EPILOG = f"""\
errors: one line on stderr, "fewstep COMMAND: error: ...". Exit status: 0 done, 1 failed, 2 bad arguments or
input, 130 interrupted. Set {DEBUG_ENV}=1 to get the full traceback instead.
"""

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": (
        "fewstep.cli.demo",
        "sample a 10x10 grid of digits with the bundled model and print quality/latency",
    ),
    "sample": ("fewstep.cli.sample", "sample images with the bundled model or a local diffusers model"),
    "bench": ("fewstep.cli.bench", "latency benchmarks: fused solver step and whole samples vs diffusers"),
    "accuracy": ("fewstep.cli.accuracy", "RMS error of every deterministic solver vs an exact ODE oracle"),
    "tune": ("fewstep.cli.tune", "fit a solver's grid to a model (bundled or --diffusers DIR), as JSON"),
    "solvers": ("fewstep.cli.solvers", "list the registered solvers, their options, diffusers equivalents"),
    "export": ("fewstep.cli.export", "the whole sampler as one ONNX file (onnxruntime; --trt: TensorRT)"),
    "serve": ("fewstep.cli.serve", "serve a model over HTTP on Ray Serve, merging requests into batches"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def one_line(message: str) -> str:
    """``message`` with its lines joined (an exception's text can span several), at most MAX_MESSAGE long."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


RawDescription = argparse.RawDescriptionHelpFormatter


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineParser(
        prog="fewstep",
        description="fewstep: a low-NFE diffusion inference engine",
        epilog=EPILOG,
        formatter_class=RawDescription,
    )
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        if not _available(module):
            continue
        p = sub.add_parser(
            name, help=help_, description=help_, epilog=EPILOG, formatter_class=RawDescription
        )
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except Exception as e:  # a broken optional dependency: the other commands still work
            p.set_defaults(_import_error=f"cannot load the {name} command ({_message(e)})")
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _message(e: BaseException) -> str:
    """The one-line text of an error: its message, with the exception type where that is not self-evident."""
    text = one_line(str(e))
    if isinstance(e, (ValueError, OSError)) and text:
        return text
    name = type(e).__name__
    return f"{name}: {text}" if text else name


def main(argv: list[str] | None = None) -> int:
    """Run ``fewstep`` with ``argv`` (default: sys.argv); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "_import_error", None):
            raise ImportError(args._import_error)
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"fewstep {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"fewstep {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, FileNotFoundError)) else 1


if __name__ == "__main__":
    sys.exit(main())
