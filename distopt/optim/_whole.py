"""Whole-tensor work on row-sharded parameters: one owner rank per tensor.

Some maths needs a parameter *whole*, not statistics of it: Muon's Newton-Schulz iteration
orthogonalises the full momentum matrix.  :func:`whole_map` gives the maths that service with the
same code in every mode:

* a parameter that is not sharded (one process, DDP, a replicated DTensor): ``fn`` runs on the
  local tensor, which is the whole one;
* a parameter split by rows across a process group (distopt ZeRO's :class:`ShardSpec`, FSDP2's
  ``Shard(0)`` DTensors): every such tensor gets **one owner rank**.  Owners are assigned by a
  deterministic greedy balance of the caller's cost per tensor (largest first, to the least
  loaded rank, ties to the lower rank), a function of shapes and order only, so every rank
  computes the same assignment without talking.  One ``all_to_all_single`` brings every rank's
  rows of a tensor to its owner, the owner runs ``fn`` once on all the whole tensors it owns
  (so it can batch tensors of one shape), and a second ``all_to_all_single`` sends each rank
  its rows of the results.  A rank sends nothing to itself and a rank may own nothing.

Bytes put on the wire per rank are about ``2 (W - 1) / W^2`` of the sharded tensors' bytes
(each rank sends the rows of the tensors it does not own, and gets its rows back), counted at
the API in :data:`STATS` when :func:`counting` is active, together with the FLOPs that ``fn``'s
caller declares as cost (the Newton-Schulz FLOPs for Muon).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distopt._dtensor import is_dtensor
from distopt.optim._core import ParamView, StepContext

__all__ = ["STATS", "WholeStats", "assign_owners", "counting", "whole_map"]

WholeFn = Callable[[list[Tensor], list[int]], list[Tensor]]


@dataclass
class WholeStats:
    """What :func:`whole_map` did on this process while :func:`counting` was active."""

    active: bool = False
    sent_bytes: int = 0  # bytes of the all_to_all input buffers (nothing is sent to oneself)
    calls: int = 0  # all_to_all_single calls
    local_cost: float = 0.0  # sum of the declared cost of the tensors this rank ran fn on
    total_cost: float = 0.0  # sum of the declared cost of every tensor (every rank's view)
    local_seconds: float = 0.0  # wall time this rank spent in fn (CUDA synchronised)
    per_call: list[dict[str, float]] = field(default_factory=list)

    def reset(self) -> None:
        self.sent_bytes = self.calls = 0
        self.local_cost = self.total_cost = self.local_seconds = 0.0
        self.per_call.clear()


#: process-wide counters (see :func:`counting`)
STATS = WholeStats()


@contextlib.contextmanager
def counting() -> Iterator[WholeStats]:
    """Count the bytes and declared cost of :func:`whole_map` in this process while active."""
    STATS.reset()
    STATS.active = True
    try:
        yield STATS
    finally:
        STATS.active = False


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each tensor: largest cost first, to the least loaded rank (ties: lower
    rank; equal costs keep their order).  Deterministic, a function of ``costs`` only."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(world), key=lambda q: (load[q], q))
        owners[i] = r
        load[r] += costs[i]
    return owners


# --------------------------------------------------------------------------- row layouts


def _dtensor_rows(p: Tensor, local_rows: int) -> tuple[list[tuple[int, int]], Any]:
    """Per-rank ``(start, rows)`` of a ``Shard(0)`` DTensor (torch.chunk layout) and its group."""
    from torch.distributed.tensor import Shard

    placements = p.placements
    dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if len(dims) != 1 or placements[dims[0]].dim != 0:
        raise NotImplementedError(
            f"whole-tensor maths supports DTensors sharded once on dim 0, got {placements}"
        )
    mesh = p.device_mesh
    group = mesh.get_group() if mesh.ndim == 1 else mesh.get_group(dims[0])
    world = mesh.size(dims[0])
    n = p.shape[0]
    chunk = -(-n // world)
    layout = [(min(r * chunk, n), max(0, min(chunk, n - r * chunk))) for r in range(world)]
    me = mesh.get_local_rank(dims[0])
    if layout[me][1] != local_rows:
        raise NotImplementedError(
            f"DTensor of shape {tuple(p.shape)}: local shard has {local_rows} rows on mesh rank {me}, expected "
            f"{layout[me][1]} (torch.chunk layout); uneven custom shardings are not supported"
        )
    return layout, group


def _zero_layouts(opt: Any, group: Any) -> dict[int, list[tuple[int, int]]]:
    """Per-rank ``(start, rows)`` of every ZeRO row shard of ``opt``, exchanged once per
    :meth:`set_sharding` (one small all-gather, in param-group order, same on every rank)."""
    import torch.distributed as dist

    specs = opt.__dict__.get("_shard_specs") or {}
    cache = opt.__dict__.get("_whole_layout_cache")
    if cache is not None and cache[0] is specs:
        return cache[1]
    ordered = [p for g in opt.param_groups for p in g["params"] if id(p) in specs]
    # on the parameters' device: NCCL moves CUDA tensors only (read once, then cached)
    device = ordered[0].device if ordered else torch.device("cpu")
    mine = torch.tensor(
        [[specs[id(p)].row_start, specs[id(p)].rows] for p in ordered], dtype=torch.int64, device=device
    )
    mine = mine.reshape(len(ordered), 2)
    world = dist.get_world_size(group)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    layouts = {
        id(p): [(int(everyone[r][k, 0]), int(everyone[r][k, 1])) for r in range(world)]
        for k, p in enumerate(ordered)
    }
    opt.__dict__["_whole_layout_cache"] = (specs, layouts)
    return layouts


# --------------------------------------------------------------------------- the service


def whole_map(
    opt: Any,
    ctx: StepContext,
    views: Sequence[ParamView],
    tensors: Sequence[Tensor],
    fn: WholeFn,
    costs: Sequence[float],
    shapes: Sequence[torch.Size] | None = None,
) -> list[Tensor]:
    """Apply ``fn`` to the *whole* tensors whose local rows are ``tensors`` and return the local
    rows of the results.

    ``tensors[i]`` holds the same rows of a ``views[i].shape``-shaped quantity as
    ``views[i].data`` (or of a ``shapes[i]``-shaped one when ``shapes`` is given: the same rows
    of dim 0, any trailing dims, e.g. a gradient with per-row state packed beside it).  ``fn(whole, idx)`` gets whole tensors (each of its view's global shape)
    and their positions ``idx`` in ``views`` and returns one tensor of the same shape for each;
    it may batch tensors of one shape.  ``costs[i]`` is the work ``fn`` does on tensor ``i``
    (owners are balanced by it).  Sharded tensors are computed once, on their owner rank.
    """
    out: list[Tensor | None] = [None] * len(views)
    if shapes is not None and len(shapes) != len(views):
        raise ValueError(f"whole_map: {len(shapes)} shapes for {len(views)} views")
    fn = _timed(fn) if STATS.active else fn
    local = [i for i, v in enumerate(views) if not v.sharded]
    sharded = [i for i, v in enumerate(views) if v.sharded]
    if STATS.active:
        STATS.total_cost += float(sum(costs))
    if local:
        for i, r in zip(local, fn([tensors[i] for i in local], local)):
            out[i] = r.to(tensors[i].dtype)
        if STATS.active:
            STATS.local_cost += float(sum(costs[i] for i in local))
    if sharded:
        gshapes = (
            [torch.Size(s) for s in shapes] if shapes is not None else [v.shape for v in views]
        )
        for i, r in zip(sharded, _sharded_map(opt, views, tensors, fn, costs, sharded, gshapes)):
            out[i] = r
    return out  # type: ignore[return-value]


def _timed(fn: WholeFn) -> WholeFn:
    def run(whole: list[Tensor], idx: list[int]) -> list[Tensor]:
        sync = [t for t in whole if t.is_cuda]
        if sync:
            torch.cuda.synchronize(sync[0].device)
        t0 = time.perf_counter()
        res = fn(whole, idx)
        if sync:
            torch.cuda.synchronize(sync[0].device)
        STATS.local_seconds += time.perf_counter() - t0
        return res

    return run


def _sharded_map(opt, views, tensors, fn, costs, idx: list[int], gshapes) -> list[Tensor]:
    import torch.distributed as dist

    layouts: list[list[tuple[int, int]]] = []
    group = None
    zero_layouts = None
    for i in idx:
        v = views[i]
        spec = opt.shard_spec(v.param) if hasattr(opt, "shard_spec") else None
        if spec is not None:
            if zero_layouts is None:
                zero_layouts = _zero_layouts(opt, spec.group)
            lay, g = zero_layouts[id(v.param)], spec.group
        elif is_dtensor(v.param):
            lay, g = _dtensor_rows(v.param, tensors[i].shape[0])
        else:
            raise RuntimeError(
                f"a sharded parameter of shape {tuple(v.shape)} has no known row layout"
            )
        if group is None:
            group = g
        elif g is not group:
            raise NotImplementedError(
                "whole-tensor maths needs every sharded parameter of a step on one process group"
            )
        layouts.append(lay)
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    owners = assign_owners([costs[i] for i in idx], world)
    dtype, device = tensors[idx[0]].dtype, tensors[idx[0]].device
    rowsize = [math.prod(gshapes[i][1:]) for i in idx]

    def flat_rows(k: int, t: Tensor) -> Tensor:
        return t.reshape(-1).to(dtype)

    # 1) rows -> owners.  Send segment for rank d: my rows of every tensor d owns (d != me).
    send_parts, send_split = [], []
    for d in range(world):
        parts = (
            []
            if d == me
            else [flat_rows(k, tensors[i]) for k, i in enumerate(idx) if owners[k] == d]
        )
        send_parts.extend(parts)
        send_split.append(sum(p.numel() for p in parts))
    mine = [k for k in range(len(idx)) if owners[k] == me]
    recv_split = [
        0 if s == me else sum(layouts[k][s][1] * rowsize[k] for k in mine) for s in range(world)
    ]
    received = _all_to_all(send_parts, send_split, recv_split, dtype, device, group)

    # 2) the owner assembles whole tensors, runs fn once on them
    whole = []
    for k in mine:
        shape = gshapes[idx[k]]
        full = torch.empty(
            (shape[0], rowsize[k]) if len(shape) else (1,), dtype=dtype, device=device
        )
        whole.append(full)
        start, rows = layouts[k][me]
        full[start : start + rows] = tensors[idx[k]].reshape(rows, rowsize[k]).to(dtype)
    offset = 0
    for s in range(world):
        if s == me:
            continue
        for k, full in zip(mine, whole):
            start, rows = layouts[k][s]
            n = rows * rowsize[k]
            full[start : start + rows] = received[offset : offset + n].view(rows, rowsize[k])
            offset += n
    results = (
        fn([w.view(gshapes[idx[k]]) for k, w in zip(mine, whole)], [idx[k] for k in mine])
        if mine
        else []
    )
    results = [
        r.to(dtype).reshape(gshapes[idx[k]][0] if len(gshapes[idx[k]]) else 1, rowsize[k])
        for k, r in zip(mine, results)
    ]
    if STATS.active:
        STATS.local_cost += float(sum(costs[idx[k]] for k in mine))

    # 3) owners -> rows.  Send segment for rank d: d's rows of every result I own.
    send_parts, send_split = [], []
    for d in range(world):
        parts = []
        if d != me:
            for k, r in zip(mine, results):
                start, rows = layouts[k][d]
                parts.append(r[start : start + rows].reshape(-1))
        send_parts.extend(parts)
        send_split.append(sum(p.numel() for p in parts))
    recv_split = [
        0
        if s == me
        else sum(layouts[k][me][1] * rowsize[k] for k in range(len(idx)) if owners[k] == s)
        for s in range(world)
    ]
    received = _all_to_all(send_parts, send_split, recv_split, dtype, device, group)

    out: list[Tensor] = [None] * len(idx)  # type: ignore[list-item]
    for k, r in zip(mine, results):
        start, rows = layouts[k][me]
        out[k] = r[start : start + rows]
    offsets = [0] * world
    for s in range(world):
        offsets[s] = sum(recv_split[:s])
    for k in range(len(idx)):
        s = owners[k]
        if s == me:
            continue
        rows = layouts[k][me][1]
        n = rows * rowsize[k]
        out[k] = received[offsets[s] : offsets[s] + n].view(rows, rowsize[k])
        offsets[s] += n
    return [o.reshape(tensors[i].shape) for o, i in zip(out, idx)]


def _all_to_all(
    parts: list[Tensor], send_split: list[int], recv_split: list[int], dtype, device, group
) -> Tensor:
    import torch.distributed as dist

    send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_split), dtype=dtype, device=device)
    if STATS.active:
        STATS.sent_bytes += send.numel() * send.element_size()
        STATS.calls += 1
    # looked up at call time, so wrappers around torch.distributed (counting, tracing) see it
    dist.all_to_all_single(recv, send, recv_split, send_split, group=group)
    return recv
