"""The ``distopt`` command.

Subcommands live next to the code they drive; each module exposes
``add_parser(subparsers)`` that registers its subcommand and sets ``func`` on it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from distopt._version import __version__

# (module, attribute) pairs; a module that fails to import (optional extra missing) is
# reported only when its subcommand is used.
_SUBCOMMAND_MODULES = (
    "distopt._cli_list",
    "distopt.schedules._cli",
    "distopt.bench",
    "distopt.checkpoint._cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distopt",
        description="Sharding-aware optimizers and schedules for distributed PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"distopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # subcommand not built yet or its extra is missing
            if exc.name is not None and exc.name.startswith("distopt"):
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"distopt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
