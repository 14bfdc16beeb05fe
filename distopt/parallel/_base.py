"""The interface every backend answers, and the single-process backend itself."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt._dtensor import local_tensor
from distopt.parallel._stats import CommStats, counted_all_reduce

__all__ = ["Backend", "Entry", "chunk_bounds", "mul_", "sum_across", "sumsq"]


@dataclass
class Entry:
    """Where one logical parameter lives on this rank (what a checkpoint writes)."""

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


def chunk_bounds(rows: int, world: int) -> list[tuple[int, int]]:
    """torch.chunk-style rows per rank (FSDP2's Shard(0) layout)."""
    size = -(-rows // world) if rows else 0
    out = []
    for r in range(world):
        s = min(r * size, rows)
        out.append((s, min(s + size, rows)))
    return out


def mul_(grads: list[Tensor], factor: float | Tensor) -> None:
    """Multiply the non-empty ``grads`` in place by ``factor`` (one ``_foreach_mul_``).

    ``factor`` may be a 0-dim float32 tensor (a factor computed on the device from collective
    results: it is not read back to the host)."""
    grads = [g for g in grads if g.numel()]
    if not grads:
        return
    if isinstance(factor, Tensor):
        with torch.no_grad():
            torch._foreach_mul_(grads, factor.to(grads[0].device))
    elif factor != 1.0:
        with torch.no_grad():
            torch._foreach_mul_(grads, factor)


def sumsq(grads: list[Tensor], device: torch.device | None = None) -> Tensor:
    """Sum of squares of every element of ``grads`` (a float32 scalar on their device; 0 on
    ``device``, default the CPU, for none)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(grads, 2)
    return torch.stack([n.float() for n in norms]).pow(2).sum()


def sum_across(
    tensors: list[Tensor | None], group: Any, like: list[Tensor], stats: CommStats | None = None
) -> list[Tensor | None]:
    """Sum ``tensors`` across ranks in one flat buffer per dtype/device; ``None`` counts as zeros.

    ``like[i]`` gives the shape, dtype and device of entry ``i``.  Returns the sums, ``None``
    where no rank had a tensor (one flag per entry rides along in each buffer).
    """
    out: list[Tensor | None] = [None] * len(like)
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, ref in enumerate(like):
        kinds.setdefault((ref.dtype, ref.device), []).append(i)
    for (dtype, device), idx in kinds.items():
        sizes = [like[i].numel() for i in idx]
        flat = torch.zeros(sum(sizes) + len(idx), dtype=dtype, device=device)
        off = 0
        for j, (i, n) in enumerate(zip(idx, sizes)):
            t = tensors[i]
            if t is not None:
                flat[off : off + n].copy_(t.detach().reshape(-1))
                flat[sum(sizes) + j] = 1
            off += n
        if stats is not None:
            stats.add("all_reduce", flat.numel() * flat.element_size())
        dist.all_reduce(flat, group=group)
        flags = flat[sum(sizes) :].tolist()
        off = 0
        for j, (i, n) in enumerate(zip(idx, sizes)):
            if flags[j] > 0:
                out[i] = flat[off : off + n].view(like[i].shape).clone()
            off += n
    return out


class Backend:
    """How one way of running distributes a model: one process (this class), DDP, distopt ZeRO,
    FSDP2 or DeepSpeed (the subclasses).  The rest of distopt asks these questions only here.

    * :meth:`entries` — what a checkpoint writes, per parameter;
    * :attr:`reducer` / :meth:`attach` — the collective the optimizer maths sums statistics with;
    * :meth:`context` / :meth:`sync_now` — gradient sync on or off, and the flush of a window;
    * :meth:`local_grads` / :meth:`grad_norm` — the gradients clipping and normalisation scale;
    * :meth:`gather_grad_sum` / :meth:`load_grad_sum` — the mid-window state of an accumulator.
    """

    #: a short name of the layout, as checkpoints record it
    kind = "single"
    #: the name users read in messages and ``GradientAccumulator.mode``
    name = "single process"
    #: the data-parallel world over which gradients are averaged (1: nothing is synchronised)
    world = 1
    group: Any = None
    #: whether :meth:`finish_window` takes its factor as a device tensor (computed from the
    #: all-reduced item counts without reading them back); False: a Python float
    device_factor = True

    @property
    def data_parallel_world(self) -> int:
        """How many ranks each contribute their own batch (the averaging denominator)."""
        return self.world

    def all_reduce_counts(self, buf: Tensor) -> None:
        """Sum a small tensor of counts over every data-parallel rank (in place)."""
        if self.data_parallel_world > 1:
            self.stats.add("all_reduce", buf.numel() * buf.element_size())
            dist.all_reduce(buf, group=self.group)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        #: every collective this backend issues is counted here
        self.stats = CommStats()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.kind = "replicated"  # each rank holds everything; the user syncs by hand

    # ------------------------------------------------------------------ the model
    @property
    def module(self) -> nn.Module:
        """The user's module (inside DDP / ShardedModule / DeepSpeed wrappers)."""
        return self.model

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():  # the user's module (no ShardedModule warning)
            return local_tensor(p).device
        return torch.device("cpu")

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.world > 1 else 0

    def named_params(self) -> list[tuple[str, Tensor]]:
        """The parameters gradients are kept for, by their FQN in the user's module."""
        return list(self.module.named_parameters())

    # ------------------------------------------------------------------ checkpoints
    def entries(self, optimizer: Any = None) -> list[Entry]:
        """One :class:`Entry` per parameter of the user's module (``named_parameters`` order)."""
        return [Entry(n, p, p, p.shape, None, 0, None) for n, p in self.module.named_parameters()]

    # ------------------------------------------------------------------ the optimizer's reducer
    @property
    def reducer(self) -> Callable[[Tensor, Any], None]:
        """``reduce(flat, group)``: sum ``flat`` in place over ``group``, counted in :attr:`stats`."""
        return counted_all_reduce(self.stats)

    def attach(self, optimizer: Any) -> None:
        """Make ``optimizer`` (a distopt optimizer) reduce its statistics with :attr:`reducer`."""
        fn = getattr(optimizer, "set_reducer", None)
        if fn is not None:
            fn(self.reducer)

    # ------------------------------------------------------------------ accumulation
    def check_accumulation(self, steps: int, reduce_every: bool) -> None:
        """Raise if this way of running cannot accumulate ``steps`` micro-batches like that."""

    def context(self, sync: bool) -> AbstractContextManager[Any]:
        """Wraps forward and backward of one micro-batch: gradient sync on (``sync``) or off."""
        return nullcontext()

    def backward(self, loss: Tensor, items_mode: bool, **kwargs: Any) -> None:
        loss.backward(**kwargs)

    def sync_now(self) -> None:
        """Synchronise gradients still held locally (the flush of a window that ends early)."""

    def after_micro_batch(self) -> None:
        """End of an off-boundary micro-batch."""

    def finish_window(self, factor: float | Tensor, items_mode: bool, micro_batches: int) -> None:
        """Normalise the synchronised gradients (and step, for engines that step themselves);
        ``factor``: a number, or a 0-dim tensor when :attr:`device_factor` is true."""
        mul_(self.local_grads(), factor)

    # ------------------------------------------------------------------ gradients
    def local_grads(self) -> list[Tensor]:
        """The synchronised gradients this rank holds (its shards when sharded), as plain
        tensors that in-place scaling changes."""
        return [local_tensor(p.grad) for p in self.model.parameters() if p.grad is not None]

    def grad_norm(self, params: Iterable[Tensor]) -> tuple[list[Tensor], Tensor]:
        """``(grads, total)``: the local gradient tensors of ``params`` that clipping scales, and
        the global L2 norm of all of them."""
        grads = [p.grad for p in params if p.grad is not None]
        return grads, sumsq(grads).sqrt()

    # ------------------------------------------------------------------ mid-window state
    def gather_grad_sum(self) -> dict[str, Tensor]:
        """The window's gradient SUM so far over all ranks, as full tensors by FQN."""
        return {n: p.grad.detach().clone() for n, p in self.named_params() if p.grad is not None}

    def load_grad_sum(self, grads: dict[str, Tensor]) -> None:
        """Make ``grads`` (a :meth:`gather_grad_sum`) this window's gradients."""
        for n, p in self.named_params():
            g = grads.get(n)
            p.grad = None if g is None or self.rank != 0 else g.to(p.device, p.dtype).clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, world={self.world})"
