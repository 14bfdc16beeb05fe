"""The collectives the sharding layer asks for, with byte counting at the API level.

Every collective distopt's ZeRO issues goes through these functions.  Given the engine's
:class:`~distopt.parallel.CommStats` (the one byte counter of distopt) they record the bytes
*requested* at the ``torch.distributed`` API (the buffer sizes), per kind, which is what ``distopt bench zero`` and ``shard_info()``
report.  What a backend moves underneath (gloo runs reduce-scatter as an all-reduce) is not
counted here.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from distopt.parallel._stats import CommStats

__all__ = ["CommStats", "all_gather", "all_to_all", "broadcast", "reduce_scatter", "ring_bytes"]


def _reduce_scatter(output: Tensor, input: Tensor, group: Any, async_op: bool = False) -> Any:
    # looked up at call time, so wrappers around torch.distributed (counting, tracing) see it
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if async_op:
        return fn(output, input, group=group, async_op=True)
    fn(output, input, group=group)
    return None


def _all_gather(output: Tensor, input: Tensor, group: Any, async_op: bool = False) -> Any:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if async_op:
        return fn(output, input, group=group, async_op=True)
    fn(output, input, group=group)
    return None


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def reduce_scatter(
    output: Tensor, input: Tensor, group: Any, stats: CommStats | None, async_op: bool = False
) -> Any:
    """Sum ``input`` (world * n elements) across ranks; this rank keeps its n-element part.

    With ``async_op=True`` the collective is only launched: the returned work handle must be
    waited before ``output`` is read (and ``input`` must stay alive until then)."""
    if stats is not None:
        stats.add("reduce_scatter", _nbytes(input))
    return _reduce_scatter(output, input, group=group, async_op=async_op)


def all_gather(
    output: Tensor, input: Tensor, group: Any, stats: CommStats | None, async_op: bool = False
) -> Any:
    """Concatenate every rank's ``input`` into ``output`` (world * n elements); ``async_op`` as
    for :func:`reduce_scatter`."""
    if stats is not None:
        stats.add("all_gather", _nbytes(output))
    return _all_gather(output, input, group=group, async_op=async_op)


def all_to_all(
    output: Tensor,
    input: Tensor,
    splits: list[int],
    group: Any,
    stats: CommStats | None,
    async_op: bool = False,
) -> Any:
    """Send ``splits[r]`` elements of ``input`` (in rank order) to rank ``r``; receive as many
    from each rank into ``output``.  Counted as ``all_to_all`` (the bytes sent) when ``stats``
    is given; the ZeRO engine counts the reduce-scatter or all-gather it stands for instead."""
    if stats is not None:
        stats.add("all_to_all", _nbytes(input))
    work = dist.all_to_all_single(output, input, splits, splits, group=group, async_op=async_op)
    return work if async_op else None


def broadcast(t: Tensor, src: int, group: Any, stats: CommStats | None) -> None:
    if stats is not None:
        stats.add("broadcast", _nbytes(t))
    dist.broadcast(t, src=src, group=group)


def ring_bytes(stats: CommStats, world_size: int) -> float:
    """Bytes each rank sends under the ring model for the requested collectives
    (see :meth:`CommStats.ring_bytes`)."""
    return stats.ring_bytes(world_size)
