"""``distopt schedule plot|table``: draw a schedule or print its lr per step."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "parse_kwargs"]


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["num_cycles=2", "decay_type=linear"]`` -> ``{"num_cycles": 2, "decay_type": "linear"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--kwarg expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(val)
    return out


def _fail(args: argparse.Namespace, exc: BaseException) -> int:
    print(f"distopt schedule {args.action}: error: {exc}", file=sys.stderr)
    return 2


def _curve(args: argparse.Namespace, name: str, kwargs: dict[str, Any]):
    from distopt.schedules._plot import schedule_curve

    return schedule_curve(name, num_training_steps=args.steps, num_warmup_steps=args.warmup,
                          lr=args.lr, kwargs=kwargs)


def _run_plot(args: argparse.Namespace) -> int:
    from distopt.schedules import list_schedules
    from distopt.schedules._plot import plot_schedule

    try:
        if args.all == bool(args.name):
            raise ValueError("give a schedule NAME or --all (not both)")
        if args.all:
            if args.kwarg:
                raise ValueError("--kwarg applies to one schedule; not with --all")
            out_dir = Path(args.output)
            if out_dir.suffix.lower() == ".png":
                raise ValueError("with --all, -o is a directory")
            names = list_schedules()
            for name in names:
                path = plot_schedule(_curve(args, name, {}), out_dir / f"schedule-{name}.png",
                                     dpi=args.dpi)
                print(path)
            return 0
        curve = _curve(args, args.name, parse_kwargs(args.kwarg))
        print(plot_schedule(curve, args.output, dpi=args.dpi))
        return 0
    except (ImportError, TypeError, ValueError) as exc:
        return _fail(args, exc)


def _run_table(args: argparse.Namespace) -> int:
    try:
        curve = _curve(args, args.name, parse_kwargs(args.kwarg))
    except (TypeError, ValueError) as exc:
        return _fail(args, exc)
    if args.every < 1:
        return _fail(args, ValueError("--every must be >= 1"))
    details = [f"{curve.num_training_steps} steps", f"lr {args.lr:g}"]
    if curve.num_warmup_steps:
        details.insert(0, f"warmup {curve.num_warmup_steps}")
    details += [f"{k}={v}" for k, v in curve.kwargs.items()]
    print(f"# {curve.name}: {', '.join(details)}")
    print(f"{'step':>6}  lr")
    last = curve.steps[-1]
    for step, lr in zip(curve.steps, curve.lrs):
        if step % args.every == 0 or step == last:
            print(f"{step:>6}  {lr:.6g}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=100, metavar="T",
                   help="number of optimizer steps (default 100)")
    p.add_argument("--warmup", type=int, default=None, metavar="W",
                   help="warmup steps (default: a tenth of --steps)")
    p.add_argument("--lr", type=float, default=1.0, help="peak learning rate (default 1.0)")
    p.add_argument("--kwarg", action="append", metavar="K=V",
                   help="schedule-specific argument, e.g. num_cycles=2 (repeatable)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``distopt schedule`` with its ``plot`` and ``table`` subcommands."""
    p = sub.add_parser("schedule", help="draw a learning-rate schedule or print it per step",
                       description="Draw a learning-rate schedule or print its lr per step. "
                                   "NAME is one of `distopt list schedules`.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    plot = actions.add_parser("plot", help="write a PNG of lr against step (needs matplotlib)")
    plot.add_argument("name", nargs="?", metavar="NAME", help="schedule name")
    plot.add_argument("--all", action="store_true", help="plot every schedule into a directory")
    plot.add_argument("-o", "--output", required=True,
                      help="PNG file (or directory with --all: DIR/schedule-NAME.png)")
    plot.add_argument("--dpi", type=int, default=80, help="resolution (default 80: 480x280 px)")
    _common(plot)
    plot.set_defaults(func=_run_plot)

    table = actions.add_parser("table", help="print the lr at each step")
    table.add_argument("name", metavar="NAME", help="schedule name")
    table.add_argument("--every", type=int, default=1, metavar="K",
                       help="print every K-th step (and the last)")
    _common(table)
    table.set_defaults(func=_run_table)

    def _usage(args: argparse.Namespace) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=_usage)
