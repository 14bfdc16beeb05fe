"""``distopt ckpt inspect DIR`` and ``distopt ckpt consolidate DIR OUT.pt``."""

from __future__ import annotations

import argparse
import datetime as _dt
import math
from pathlib import Path


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _inspect(args: argparse.Namespace) -> int:
    from distopt.checkpoint import read_meta, verify

    path = Path(args.dir)
    meta = read_meta(path)
    if args.verify:
        verify(path)
    when = _dt.datetime.fromtimestamp(meta["time"]).isoformat(timespec="seconds")
    print(f"checkpoint   {path}")
    print(
        f"saved        {when} by distopt {meta['distopt_version']} (torch {meta['torch_version']})"
    )
    print(f"step         {meta.get('step')}")
    print(f"world size   {meta['world_size']}  mode {meta['mode']}")
    print(f"optimizer    {meta['optimizer_class']}")
    print(
        f"scheduler    {meta['scheduler_class']}"
        + (
            f" (last_epoch {meta['scheduler'].get('last_epoch')})"
            if isinstance(meta.get("scheduler"), dict)
            else ""
        )
    )
    acc = meta.get("accumulator")
    acc_rows = []
    if acc is not None:
        pos = {k: v for k, v in acc.items() if k not in ("grads", "grads_in")}
        print(f"accumulator  {_summary(pos)}")
        for name, g in (acc.get("grads") or {}).items():
            if isinstance(g, dict):  # format 2: sharded DCP entries acc/<name>
                shape, dtype = list(g["shape"]), g["dtype"]
            else:  # format 1: a tensor inside the metadata file
                shape, dtype = list(g.shape), str(g.dtype).replace("torch.", "")
            acc_rows.append((f"acc/{name}", shape, dtype))
    if meta.get("extra") is not None:
        print(f"extra        {_summary(meta['extra'])}")
    if meta.get("param_groups"):
        for i, g in enumerate(meta["param_groups"]):
            hp = {k: v for k, v in g.items() if k != "params" and not isinstance(v, (list, dict))}
            print(f"group {i}      {len(g['params'])} params  {hp}")
    print()
    print(f"{'parameter':40s} {'shape':>16s} {'dtype':>9s}  state")
    total_state = 0
    for fqn, shape in meta["params"].items():
        states = meta["state_meta"].get(fqn, {})
        parts = []
        for name, info in states.items():
            nbytes = math.prod(info["shape"]) * _itemsize(info["dtype"])
            total_state += nbytes
            tag = "" if info["kind"] == "rows" else " repl"
            parts.append(f"{name}{list(info['shape'])}{tag}")
        print(
            f"{fqn:40s} {str(tuple(shape)):>16s} {meta['dtypes'].get(fqn, ''):>9s}  {', '.join(parts)}"
        )
    if acc_rows:
        print()
        print(f"{'accumulated gradient sum (mid-window)':40s} {'shape':>16s} {'dtype':>9s}  size")
        for key, shape, dtype in acc_rows:
            size = _fmt_bytes(math.prod(shape) * _itemsize(dtype))
            print(f"{key:40s} {str(shape):>16s} {dtype:>9s}  {size}")
    print()
    print(
        f"parameters: {len(meta['params'])}, optimizer state: {_fmt_bytes(total_state)} in all "
        f"(~{_fmt_bytes(total_state / max(meta['world_size'], 1))} per rank when saved)"
    )
    return 0


def _summary(obj: object, depth: int = 0) -> str:
    """``repr`` with every tensor replaced by its shape and dtype (never its values)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return f"<tensor {list(obj.shape)} {str(obj.dtype).replace('torch.', '')}>"
    if depth > 4:
        return "..."
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k!r}: {_summary(v, depth + 1)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        inner = ", ".join(_summary(v, depth + 1) for v in obj[:20]) + (
            ", ..." if len(obj) > 20 else ""
        )
        return f"[{inner}]" if isinstance(obj, list) else f"({inner})"
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


def _itemsize(dtype: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _consolidate(args: argparse.Namespace) -> int:
    import torch

    from distopt.checkpoint import consolidate

    out = consolidate(args.dir)
    if out["optimizer"] is None:
        raise ValueError(f"{args.dir} holds no optimizer state")
    payload = out if args.everything else out["optimizer"]
    torch.save(payload, args.out)
    if args.model_out:
        torch.save(out["model"], args.model_out)
    print(f"wrote {args.out}" + (f" and {args.model_out}" if args.model_out else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ckpt", help="inspect or consolidate distopt checkpoints")
    s = p.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    i = s.add_parser(
        "inspect", help="print step, world size, mode, optimizer, schedule and state sizes"
    )
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true", help="also check every file's size and CRC32")
    i.set_defaults(func=_inspect)
    c = s.add_parser(
        "consolidate", help="write a classic torch.save optimizer state_dict (one process)"
    )
    c.add_argument("dir")
    c.add_argument("out", help="output .pt file: the optimizer state_dict (torch.optim format)")
    c.add_argument("--model-out", help="also write the model state_dict here")
    c.add_argument(
        "--everything",
        action="store_true",
        help="write a dict with model, optimizer, scheduler, accumulator and extra instead",
    )
    c.set_defaults(func=_consolidate)
