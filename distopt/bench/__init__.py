"""``distopt bench``: benchmarks run side by side with the peer libraries, in one process run.

Subcommands come from the modules ``distopt.bench.step`` (optimizer step time), ``.zero``
(sharded training: step time, state bytes, traffic) and ``.ckpt`` (checkpoint save/load); each
exposes ``add_parser(subparsers)``.  Modules not present in this installation are skipped.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["add_parser"]

_MODULES = ("distopt.bench.step", "distopt.bench.zero", "distopt.bench.ckpt")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmarks vs torch / timm / transformers / DeepSpeed")
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that benchmark is not part of this installation (yet)
                continue
            raise
        mod.add_parser(bench_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)
