"""``fewstep solvers [NAME]``: the registry, or one solver's options and a sample program."""

from __future__ import annotations

import argparse

from .checks import positive_int_arg

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one solver's options and a sample program")
    parser.add_argument("--nfe", type=positive_int_arg, default=4,
                        help="NFE of the sample program shown with a name (default: 4)")


def run(args: argparse.Namespace) -> int:
    """``fewstep solvers [NAME]``: the registry, or one solver's options and program."""
    import dataclasses

    from .. import solvers as S

    if args.name is None:
        for name in S.available():
            info = S.get(name)
            kind = (
                "stochastic"
                if info.stochastic is True
                else ("deterministic" if info.stochastic is False else "option-dependent")
            )
            print(f"{name:14s} {kind:16s} {info.doc}")
        return 0
    info = S.get(args.name)
    program = S.build(args.name, S.ModelSpec(S.schedules.DiscreteVP()), args.nfe)  # errors before any output
    print(info.doc)
    for f in dataclasses.fields(info.options):
        print(f"  {f.name} = {f.default!r}")
    print(program.describe())
    return 0
