"""``distopt list``: the optimizers and schedules this installation provides."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from distopt.optim import list_optimizers
    from distopt.schedules import list_schedules

    if args.what in ("all", "optimizers"):
        print("optimizers:")
        for name in list_optimizers():
            print(f"  {name}")
    if args.what in ("all", "schedules"):
        print("schedules:")
        for name in list_schedules():
            print(f"  {name}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the available optimizers and schedules")
    p.add_argument("what", nargs="?", default="all", choices=["all", "optimizers", "schedules"])
    p.set_defaults(func=_run)
