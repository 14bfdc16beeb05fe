"""Where each logical tensor lives on this rank, whatever the way of running.

The checkpoint format is *logical*: keyed by parameter name (FQN) and state name, with global
shapes; ranks never appear.  This module maps a (model, optimizer) pair in any mode — one
process, DDP, distopt ZeRO-1/2, FSDP2 — to that logical view:

* for each parameter: its FQN, global shape, the tensor the optimizer keys its state by, and
  which rows of dim 0 every rank holds (None when the tensor is complete on every rank);
* the same rows rule applies to row-sharded optimizer state (``exp_avg``, Adafactor's row
  statistics, ...), while replicated state (step counters, Adafactor's column statistics of a
  matrix) is complete on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt._dtensor import is_dtensor, local_and_sharding


@dataclass
class Entry:
    fqn: str
    param: Tensor  # the model's parameter (full tensor, or DTensor under FSDP2)
    opt_tensor: Tensor  # the tensor the optimizer's state is keyed by
    shape: torch.Size  # global shape
    bounds: list[tuple[int, int]] | None  # rows held by each rank (None: complete everywhere)
    rank: int
    group: Any

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 0 else 1


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / distopt's ShardedModule wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    from distopt.zero import ShardedModule

    while isinstance(model, (DistributedDataParallel, ShardedModule)):
        model = model.module
    return model


def detect_mode(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> str:
    from torch.nn.parallel import DistributedDataParallel

    from distopt.zero import ShardedModule

    if isinstance(model, ShardedModule):
        return f"zero{model.engine.stage}"
    if isinstance(model, DistributedDataParallel):
        return "ddp"
    if any(is_dtensor(p) for p in model.parameters()):
        return "fsdp2"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "replicated"
    return "single"


def _chunk_bounds(rows: int, world: int) -> list[tuple[int, int]]:
    """torch.chunk-style rows per rank (FSDP2's Shard(0) layout)."""
    size = -(-rows // world) if rows else 0
    out = []
    for r in range(world):
        s = min(r * size, rows)
        out.append((s, min(s + size, rows)))
    return out


def entries(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[Entry]:
    """One :class:`Entry` per parameter of ``model`` (in ``named_parameters`` order)."""
    from distopt.zero import ShardedModule

    if isinstance(model, ShardedModule):
        eng = model.engine
        slot_by_name = {s.name: s for s in eng.slots}
        out = []
        for name, p in model.module.named_parameters():
            s = slot_by_name.get(name)
            if s is None:
                out.append(Entry(name, p, p, p.shape, None, eng.rank, eng.group))
            else:
                out.append(
                    Entry(
                        name, p, eng.shards[s.index], s.shape, list(s.bounds), eng.rank, eng.group
                    )
                )
        return out
    inner = unwrap(model)
    out = []
    for name, p in inner.named_parameters():
        if is_dtensor(p):
            _, sharded, group = local_and_sharding(p)
            if sharded:
                world = dist.get_world_size(group)
                r = dist.get_rank(group)
                out.append(Entry(name, p, p, p.shape, _chunk_bounds(p.shape[0], world), r, group))
                continue
        out.append(Entry(name, p, p, p.shape, None, 0, None))
    return out


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
