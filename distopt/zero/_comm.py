"""The collectives the sharding layer asks for, with byte counting at the API level.

Every collective distopt's ZeRO issues goes through these three functions.  When a
:class:`CommCounter` is active they record the bytes *requested* at the ``torch.distributed``
API (the buffer sizes), per kind, which is what ``distopt bench zero`` and ``shard_info()``
report.  What a backend moves underneath (gloo runs reduce-scatter as an all-reduce) is not
counted here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _reduce_scatter(output: Tensor, input: Tensor, group: Any) -> None:
    # looked up at call time, so wrappers around torch.distributed (counting, tracing) see it
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, input, group=group)


def _all_gather(output: Tensor, input: Tensor, group: Any) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, input, group=group)


@dataclass
class CommStats:
    """Bytes and calls per collective kind (``reduce_scatter``, ``all_gather``, ``all_reduce``)."""

    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    @property
    def total_bytes(self) -> int:
        return int(sum(self.bytes.values()))

    def as_dict(self) -> dict[str, Any]:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "total_bytes": self.total_bytes}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def reduce_scatter(output: Tensor, input: Tensor, group: Any, stats: CommStats | None) -> None:
    """Sum ``input`` (world * n elements) across ranks; this rank keeps its n-element part."""
    if stats is not None:
        stats.add("reduce_scatter", _nbytes(input))
    _reduce_scatter(output, input, group=group)


def all_gather(output: Tensor, input: Tensor, group: Any, stats: CommStats | None) -> None:
    """Concatenate every rank's ``input`` into ``output`` (world * n elements)."""
    if stats is not None:
        stats.add("all_gather", _nbytes(output))
    _all_gather(output, input, group=group)


def all_reduce(t: Tensor, group: Any, stats: CommStats | None) -> None:
    """Sum ``t`` in place across ranks."""
    if stats is not None:
        stats.add("all_reduce", _nbytes(t))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def broadcast(t: Tensor, src: int, group: Any, stats: CommStats | None) -> None:
    if stats is not None:
        stats.add("broadcast", _nbytes(t))
    dist.broadcast(t, src=src, group=group)


def ring_bytes(stats: CommStats, world_size: int) -> float:
    """Bytes each rank sends under the ring model for the requested collectives.

    all-reduce: 2 (p-1)/p of the buffer; reduce-scatter and all-gather: (p-1)/p of the full buffer.
    """
    p = world_size
    if p <= 1:
        return 0.0
    f = (p - 1) / p
    b = stats.bytes
    return 2 * f * b["all_reduce"] + f * (b["reduce_scatter"] + b["all_gather"]) + f * b["broadcast"]


def device_of(t: Tensor) -> torch.device:
    return t.device
