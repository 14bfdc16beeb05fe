"""Where each logical tensor lives on this rank, whatever the way of running.

The checkpoint format is *logical*: keyed by parameter name (FQN) and state name, with global
shapes; ranks never appear.  This module asks the run's backend
(:func:`distopt.parallel.backend_for`) for that logical view of a (model, optimizer) pair in any mode — one process, DDP, distopt ZeRO-1/2, FSDP2:

* for each parameter: its FQN, global shape, the tensor the optimizer keys its state by, and
  which rows of dim 0 every rank holds (None when the tensor is complete on every rank);
* the same rows rule applies to row-sharded optimizer state (``exp_avg``, Adafactor's row
  statistics, ...), while replicated state (step counters, Adafactor's column statistics of a
  matrix) is complete on every rank.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from distopt._dtensor import is_dtensor
from distopt._torch_private import sharded_tensor_from_metadata
from distopt.parallel import Entry, backend_for, unwrap
from distopt.parallel import chunk_bounds as _chunk_bounds

__all__ = [
    "Entry",
    "_chunk_bounds",
    "detect_mode",
    "entries",
    "local_of",
    "row_sharded",
    "state_is_row_sharded",
    "unwrap",
]


def detect_mode(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> str:
    """The layout name a checkpoint records (``single``, ``replicated``, ``ddp``, ``zero1``,
    ``zero2``, ``fsdp2``), from the run's :mod:`distopt.parallel` backend."""
    return backend_for(model).kind


def entries(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[Entry]:
    """One :class:`Entry` per parameter of ``model`` (in ``named_parameters`` order)."""
    return backend_for(model).entries(optimizer)


def local_of(entry: Entry, t: Tensor) -> Tensor:
    """The local tensor of a parameter or state value (DTensor -> its local shard)."""
    if is_dtensor(t):
        return t.to_local()
    return t


def state_is_row_sharded(optimizer: Any, name: str, value: Any, shape: torch.Size) -> bool:
    """The logical classification of a state value (same answer in every mode)."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return False
    fn = getattr(optimizer, "state_is_sharded", None)
    if fn is not None:
        return bool(fn(name, value, shape))
    return len(shape) > 0 or value.dim() > 0


def row_sharded(
    local: Tensor,
    gshape: tuple[int, ...],
    bounds: list[tuple[int, int]],
    rank: int,
    group: Any = None,
) -> Any:
    """A DCP-savable view of a tensor split by dim-0 rows (arbitrary, uneven bounds).

    ``bounds`` and ``rank`` count the ranks of ``group`` (None: the world), the group the rows
    are split over; under hybrid sharding and HSDP every replica holds the same rows and DCP
    writes them once.
    """
    import torch.distributed as dist

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata
        from torch.distributed._shard.sharded_tensor.metadata import (
            ShardedTensorMetadata,
            TensorProperties,
        )

        dev = local.device
        metas, shards = [], []
        for r, (s, e) in enumerate(bounds):
            if e <= s:
                continue
            where = str(dev) if r == rank else dev.type
            m = ShardMetadata(
                [s] + [0] * (len(gshape) - 1),
                [e - s] + list(gshape[1:]),
                f"rank:{r if group is None else dist.get_global_rank(group, r)}/{where}",
            )
            metas.append(m)
            if r == rank:
                shards.append(Shard(local.contiguous(), m))
        props = TensorProperties(
            dtype=local.dtype, layout=torch.strided, requires_grad=False,
            memory_format=torch.contiguous_format, pin_memory=False,
        )  # fmt: skip
        gm = ShardedTensorMetadata(metas, torch.Size(gshape), props)
        return sharded_tensor_from_metadata(shards, gm, process_group=group)
