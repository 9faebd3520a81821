"""``fewstep solvers [NAME]``: the registry, or one solver's options and a sample program."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one solver's options and a sample program")
    parser.add_argument("--nfe", type=int, default=4, help="NFE of the sample program shown with a name")


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
    print(info.doc)
    for f in dataclasses.fields(info.options):
        print(f"  {f.name} = {f.default!r}")
    spec = S.ModelSpec(S.schedules.DiscreteVP())
    print(S.build(args.name, spec, args.nfe).describe())
    return 0
