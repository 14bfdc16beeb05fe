"""The one layer that knows how a run is distributed.

``backend_for(model)`` looks at a model as it is trained — a plain module, DDP, distopt's
:class:`~distopt.zero.ShardedModule`, an FSDP2 (``fully_shard``) model or a DeepSpeed engine —
and returns a :class:`Backend` that answers, for that way of running, what the rest of distopt
needs to know:

* :meth:`Backend.entries` — per parameter: FQN, parameter, the tensor the optimizer keys its
  state by, global shape, which rows each rank holds (the checkpoint layer writes these);
* :attr:`Backend.reducer` / :meth:`Backend.attach` — the collective the optimizer maths sums its
  shape-aware statistics with (injected with ``DistOptimizer.set_reducer``), counted in the
  backend's one :class:`CommStats`;
* :meth:`Backend.context` / :meth:`Backend.sync_now` — gradient sync on or off for a
  micro-batch, and the flush of an accumulation window that ends early;
* :meth:`Backend.local_grads` / :meth:`Backend.grad_norm` — the gradients that loss
  normalisation and clipping scale (this rank's shards when sharded) and their global norm;
* :meth:`Backend.gather_grad_sum` / :meth:`Backend.load_grad_sum` — the mid-window state an
  accumulator saves, as full tensors by FQN (loads at any world size, in any mode).

``distopt.accumulate``, ``distopt.checkpoint``, ``distopt.zero.clip_grad_norm_`` and the
integrations ask these questions here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from distopt._dtensor import is_dtensor
from distopt.parallel._base import Backend, Entry, chunk_bounds, sumsq
from distopt.parallel._ddp import DDPBackend
from distopt.parallel._deepspeed import DeepSpeedBackend, is_deepspeed_engine
from distopt.parallel._fsdp2 import FSDP2Backend, dtensor_grad_norm
from distopt.parallel._stats import CommStats, counted_all_reduce
from distopt.parallel._zero import ZeroBackend

__all__ = [
    "Backend",
    "CommStats",
    "DDPBackend",
    "DeepSpeedBackend",
    "Entry",
    "FSDP2Backend",
    "ZeroBackend",
    "backend_for",
    "backend_for_params",
    "chunk_bounds",
    "counted_all_reduce",
    "unwrap",
]


def _fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def backend_for(model: Any, optimizer: Any = None) -> Backend:
    """The :class:`Backend` of ``model`` as it is trained.

    With ``optimizer`` (a distopt optimizer), it is attached: its shape-aware statistics are
    reduced with the backend's counted reducer.

    Raises:
        TypeError: ``model`` is not a module (or DeepSpeed engine); FSDP1.
    """
    from torch.nn.parallel import DistributedDataParallel

    from distopt.zero import ShardedModule

    if is_deepspeed_engine(model):
        backend: Backend = DeepSpeedBackend(model)
    elif isinstance(model, ShardedModule):
        backend = ZeroBackend(model, model.engine)
    elif isinstance(model, DistributedDataParallel):
        backend = DDPBackend(model)
    elif not isinstance(model, nn.Module):
        raise TypeError(
            f"distopt: model must be an nn.Module (or a DeepSpeed engine), got {type(model).__name__}"
        )
    elif any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise TypeError(
            "distopt: FSDP1 (FullyShardedDataParallel) is not supported; use FSDP2 "
            "(torch.distributed.fsdp.fully_shard)"
        )
    else:
        fsdp = _fsdp2_modules(model)
        if fsdp or any(is_dtensor(p) for p in model.parameters()):
            backend = FSDP2Backend(model, fsdp)
        else:
            backend = Backend(model)
    if optimizer is not None:
        backend.attach(optimizer)
    return backend


class _ParamsBackend(Backend):
    """Parameters given without their model: DTensor gradients are summed per process group."""

    def grad_norm(self, params: Iterable[Tensor]) -> tuple[list[Tensor], Tensor]:
        grads = [p.grad for p in params if p.grad is not None]
        if any(is_dtensor(g) for g in grads):
            return dtensor_grad_norm(grads)
        return grads, sumsq(grads).sqrt()


def backend_for_params(params: list[Tensor]) -> Backend:
    """The backend that holds the gradients of ``params``: the ZeRO engine managing them, or
    the tensors themselves (DTensor gradients included).

    Raises ValueError for parameters partly managed by distopt ZeRO (or by two shard calls).
    """
    from distopt.zero import engine_of

    engine = engine_of(params)
    if engine is not None:
        return ZeroBackend(None, engine)
    return _ParamsBackend(nn.Module())


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / distopt's ShardedModule wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    from distopt.zero import ShardedModule

    while isinstance(model, (DistributedDataParallel, ShardedModule)):
        model = model.module
    return model
