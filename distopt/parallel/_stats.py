"""One byte counter for every collective distopt asks for (:class:`CommStats`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["CommStats", "counted_all_reduce"]


@dataclass
class CommStats:
    """Bytes and calls per collective kind (``reduce_scatter``, ``all_gather``, ``all_reduce``,
    ``broadcast``), as requested at the ``torch.distributed`` API (the buffer sizes).

    The ZeRO engine, the reducer the optimizer maths uses and ``distopt bench`` all count into
    this one type; what a backend moves underneath (gloo runs reduce-scatter as an all-reduce)
    is not counted here.
    """

    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def add(self, kind: str, nbytes: int) -> None:
        """Record one collective of ``kind`` over a buffer of ``nbytes`` bytes."""
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.bytes.clear()
        self.calls.clear()

    @property
    def total_bytes(self) -> int:
        return int(sum(self.bytes.values()))

    def ring_bytes(self, world_size: int) -> float:
        """Bytes each rank sends under the ring model for the counted collectives.

        all-reduce: 2 (p-1)/p of the buffer; reduce-scatter, all-gather and broadcast: (p-1)/p;
        all-to-all (Muon's rows to and from owner ranks): the bytes this rank sends, as counted.
        """
        p = world_size
        if p <= 1:
            return 0.0
        f = (p - 1) / p
        b = self.bytes
        ring = f * (b["reduce_scatter"] + b["all_gather"] + b["broadcast"])
        return 2 * f * b["all_reduce"] + ring + b["all_to_all"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes": dict(self.bytes),
            "calls": dict(self.calls),
            "total_bytes": self.total_bytes,
        }


def counted_all_reduce(stats: CommStats | None) -> Callable[[Tensor, Any], None]:
    """A reducer for :meth:`DistOptimizer.set_reducer`: sum ``flat`` in place over ``group``,
    counted in ``stats`` (when given)."""

    def reduce(flat: Tensor, group: Any) -> None:
        import torch.distributed as dist

        if stats is not None:
            stats.add("all_reduce", flat.numel() * flat.element_size())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)

    return reduce
