"""ZeRO-1 / ZeRO-2 partitioned optimizer state for data-parallel training.

``model, optimizer = distopt.shard(model, optimizer, stage=1)`` partitions the optimizer state
(stage 1) and also the gradients (stage 2) by dim-0 rows of every parameter, balanced across
ranks.  Every rank updates its rows with the *same* optimizer maths (shape-aware statistics are
summed across ranks in one batched all-reduce per phase), then the parameters are all-gathered.
The returned model is used like a DDP model: forward, backward, ``no_sync()``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt._dtensor import is_dtensor
from distopt.zero._comm import CommStats, ring_bytes
from distopt.zero._engine import ZeroEngine, engine_of

_log = logging.getLogger("distopt.zero")

__all__ = ["CommStats", "ShardedModule", "ZeroEngine", "clip_grad_norm_", "engine_of", "ring_bytes", "shard"]


class ShardedModule(nn.Module):
    """A model whose gradients are reduce-scattered to the owners of each parameter's rows.

    Use it like ``DistributedDataParallel``: call it for the forward pass, call ``backward`` on
    the loss, wrap micro-batches that should not synchronise in :meth:`no_sync`.
    ``state_dict()`` / ``load_state_dict()`` are those of the wrapped module (no ``module.``
    prefix): the parameters are complete and identical on every rank after each step.
    """

    def __init__(self, module: nn.Module, engine: ZeroEngine):
        super().__init__()
        self.module = module
        self._engine = engine

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        engine = self._engine
        if torch.is_grad_enabled():
            if not engine.sync_enabled:
                engine._pending = True  # this forward's backward leaves full gradients behind
            else:
                # Every rank that runs backward through the output reduces every bucket at
                # its end, even a rank where no managed parameter gets a gradient.
                for t in _tensors_in(out):
                    if t.requires_grad:
                        t.register_hook(_QueueReduction(engine))
        return out

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip gradient communication inside the context (gradients accumulate locally).

        Stage 1 never communicates during backward, so this is free there; stage 2 keeps full
        gradients until the first backward outside the context, which reduce-scatters them.
        """
        with self._engine.no_sync():
            yield

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> ShardedModule:
        # .to() / .float() / .cuda() may give the parameters new storage; the optimizer's row
        # shards are views into it and must follow (their identity, hence the state, is kept).
        out = super()._apply(fn, *args, **kwargs)
        self._engine.rebind_shards()
        return out

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The wrapped module's parameters (complete on every rank, as under DDP).

        Between backward and the step the gradients are not in their ``.grad`` but in the
        optimizer's row shards, so ``torch.nn.utils.clip_grad_norm_(model.parameters(), c)``
        would see none; iterating the parameters then logs a warning that names
        :func:`distopt.clip_grad_norm_`, which takes ``model.parameters()`` and is exact.
        """
        engine = self._engine
        quiet = getattr(_QUIET, "on", False)
        if not quiet and not engine._warned_parameters and engine.holds_reduced_grads():
            engine._warned_parameters = True
            if engine.rank == 0:
                _log.warning(
                    "model.parameters() was iterated after backward under distopt.shard: the "
                    "reduced gradients live in the optimizer's row shards, not in the parameters' "
                    ".grad, so torch.nn.utils.clip_grad_norm_(model.parameters(), ...) and other "
                    "code reading p.grad see none. Clip with distopt.clip_grad_norm_(model or "
                    "model.parameters(), ...), which computes the global norm of the shards."
                )
        yield from super().parameters(recurse)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the full gradients and the reduced gradient shards."""
        self._engine.zero_grad(set_to_none)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load into the wrapped module; the optimizer's rows (master copies too) follow."""
        if assign:
            raise ValueError(
                "ShardedModule.load_state_dict: assign=True would replace the parameter objects "
                "that distopt.shard partitioned (their gradient hooks and optimizer rows); load "
                "with assign=False (the default), which copies into the existing parameters"
            )
        out = self.module.load_state_dict(state_dict, strict=strict)
        self._engine._refresh_masters()
        return out

    @property
    def engine(self) -> ZeroEngine:
        return self._engine

    def shard_info(self) -> dict[str, Any]:
        return self._engine.shard_info()


class _QueueReduction:
    """Tensor hook on a model output: queues the engine's end-of-backward reduction."""

    def __init__(self, engine: ZeroEngine) -> None:
        self.engine = engine

    def __call__(self, grad: Tensor) -> None:
        self.engine._queue_end_of_backward()


def _tensors_in(out: Any) -> Iterator[Tensor]:
    """The tensors in a model output: a tensor, or lists, tuples and dicts of them."""
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for x in out:
            yield from _tensors_in(x)
    elif isinstance(out, dict):
        for x in out.values():
            yield from _tensors_in(x)


_QUIET = threading.local()  # set while distopt.clip_grad_norm_ lists ShardedModule parameters


def _list_quietly(params: Iterable[Tensor]) -> list[Tensor]:
    """``list(params)``; a ``ShardedModule.parameters()`` generator does not warn here."""
    _QUIET.on = True
    try:
        return list(params)
    finally:
        _QUIET.on = False


def _check_model(model: nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise ValueError(
            "distopt.shard: the model is already wrapped in DistributedDataParallel; pass the "
            "plain module (distopt.shard replaces DDP and does its gradient synchronisation)"
        )
    if isinstance(model, ShardedModule):
        raise ValueError("distopt.shard: the model is already sharded by distopt.shard")
    if type(model).__name__.startswith("FSDP") or hasattr(model, "_fsdp_wrapped_module"):
        raise ValueError("distopt.shard: the model is already wrapped by FSDP; use one of the two")
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(
            f"distopt.shard: parameters are on mixed devices {sorted(str(d) for d in devices)}; "
            "move the model to one device per rank first"
        )
    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError(
            "distopt.shard: the model has DTensor parameters (FSDP2/tensor parallel); build the "
            "distopt optimizer directly on them instead — it handles DTensor shards itself"
        )


def shard(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stage: int = 1,
    process_group: Any = None,
    bucket_mb: float = 25.0,
    master_dtype: torch.dtype | None = None,
    broadcast_from_rank0: bool = True,
    *,
    mesh: Any = None,
    replicate_group: Any = None,
) -> tuple[ShardedModule, torch.optim.Optimizer]:
    """Partition ``optimizer``'s state (stage 1) and the gradients (stage 2) across ranks.

    Args:
        model: the plain (unwrapped) model, already on this rank's device.
        optimizer: a distopt optimizer (or ``Lookahead`` around one) built on ``model``'s
            parameters, before its first step.  It is changed in place and returned.
        stage: 1 = optimizer state partitioned, gradients reduce-scattered once at the step;
            2 = gradients also partitioned, reduce-scattered in buckets during backward.
        process_group: the data-parallel group (default: the whole world).
        bucket_mb: size of the flat communication buckets, in MiB (default 25).
        master_dtype: keep fp32 (or another dtype) master copies of the local rows of low-
            precision parameters; the optimizer updates the master copy and the model gets the
            rounded value (default None: update the parameters in their own dtype, via fp32).
        broadcast_from_rank0: start every rank from rank 0's parameters and buffers, as DDP does
            (default True).
        mesh: hybrid sharding (HSDP; DeepSpeed's hpZ/MiCS): a 2-D ``DeviceMesh`` with dims named
            ``("replicate", "shard")`` (unnamed: dim 0 replicates, dim 1 shards, as FSDP2's HSDP),
            e.g. ``init_device_mesh("cuda", (nodes, gpus_per_node), mesh_dim_names=("replicate",
            "shard"))``.  Gradients are reduce-scattered within the shard group, then only the
            local rows are all-reduced across the replicate group (averaged over every rank);
            optimizer state is partitioned and shape-aware statistics are reduced within the
            shard group; parameters are all-gathered within it.  A 1-D mesh means
            ``process_group=mesh.get_group()``.  Exclusive with ``process_group``.
        replicate_group: hybrid sharding with explicit groups: ``process_group`` is this rank's
            shard group, ``replicate_group`` the ranks holding the same rows in the other shard
            groups (e.g. the same local rank on every node).

    Returns:
        ``(sharded_model, optimizer)``.

    Raises:
        ValueError: bad stage, an already wrapped model, mixed devices, a process group this rank
            is not in, optimizer parameters that are not the model's, an optimizer with state.
        TypeError: an optimizer that is not a distopt optimizer.
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    if stage not in (1, 2):
        raise ValueError(f"distopt.shard: stage must be 1 or 2, got {stage!r}")
    if not isinstance(bucket_mb, (int, float)) or bucket_mb <= 0:
        raise ValueError(f"distopt.shard: bucket_mb must be a positive number, got {bucket_mb!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "distopt.shard needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group, or launch with torchrun)"
        )
    _check_model(model)
    if mesh is not None:
        if process_group is not None or replicate_group is not None:
            raise ValueError(
                "distopt.shard: pass either mesh= or process_group=/replicate_group=, not both"
            )
        process_group, replicate_group = _groups_of_mesh(mesh)
    if replicate_group is not None and dist.get_rank(replicate_group) < 0:
        raise ValueError(
            f"distopt.shard: this process (global rank {dist.get_rank()}) is not a member of "
            "the given replicate_group"
        )
    if process_group is not None and dist.get_rank(process_group) < 0:
        raise ValueError(
            f"distopt.shard: this process (global rank {dist.get_rank()}) is not a member of "
            "the given process_group"
        )
    from distopt.parallel import backend_for

    engine = ZeroEngine(model, optimizer, stage, process_group, bucket_mb, master_dtype, broadcast_from_rank0, replicate_group=replicate_group)
    sharded = ShardedModule(model, engine)
    backend_for(sharded, optimizer)  # the optimizer's reductions are counted with the engine's
    return sharded, optimizer



def _groups_of_mesh(mesh: Any) -> tuple[Any, Any]:
    """(shard group, replicate group or None) of a 1-D or 2-D ``DeviceMesh``."""
    ndim = getattr(mesh, "ndim", None)
    if ndim == 1:
        return mesh.get_group(), None
    if ndim != 2:
        raise ValueError(
            "distopt.shard: mesh must be a 1-D or 2-D torch.distributed DeviceMesh "
            f"(replicate x shard), got {type(mesh).__name__} with ndim={ndim}"
        )
    names = tuple(mesh.mesh_dim_names or ())
    if not names:
        return mesh.get_group(1), mesh.get_group(0)
    if set(names) != {"replicate", "shard"}:
        raise ValueError(
            "distopt.shard: a 2-D mesh needs the dim names ('replicate', 'shard') (or none: dim 0 "
            f"replicates, dim 1 shards), got {names}"
        )
    return mesh.get_group("shard"), mesh.get_group("replicate")


@torch.no_grad()
def clip_grad_norm_(
    model_or_params: nn.Module | Iterable[Tensor] | Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Clip gradients by their *global* norm, also when they are sharded; returns the norm.

    * a :class:`ShardedModule` (distopt ZeRO), or parameters of one (``model.parameters()``, as
      written for DDP, or a subset): the reduced gradient rows are clipped; the norm is summed
      across ranks in one all-reduce;
    * DTensor gradients (FSDP2): local partial sums, one all-reduce per process group;
    * anything else: the plain local computation of ``torch.nn.utils.clip_grad_norm_``.
    """
    if max_norm is None or not (max_norm > 0):
        raise ValueError(f"clip_grad_norm_: max_norm must be > 0, got {max_norm!r}")
    if norm_type != 2.0:
        raise ValueError("clip_grad_norm_: only the L2 norm (norm_type=2) is supported for sharded gradients")
    from distopt.parallel import backend_for, backend_for_params

    if isinstance(model_or_params, ShardedModule):
        backend = backend_for(model_or_params)
        params = [p for _, p in backend.named_params()]
    else:
        params = (
            list(model_or_params.parameters()) if isinstance(model_or_params, nn.Module)
            else [model_or_params] if isinstance(model_or_params, Tensor)
            else _list_quietly(model_or_params)
        )
        backend = backend_for_params(params)
    grads, total = backend.grad_norm(params)
    if error_if_nonfinite and not torch.isfinite(total):  # opt-in: a host read, as in torch
        raise RuntimeError(f"clip_grad_norm_: the total norm of the gradients is {float(total)}")
    # The norm and the clip factor stay tensors on the gradients' device (no host read): a
    # factor clamped to 1 multiplies by exactly 1 where there is nothing to clip.
    grads = [g for g in grads if g.numel()]
    if grads:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total

