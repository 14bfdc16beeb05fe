"""distopt's own ZeRO-1/2 (:func:`distopt.shard`), asked through the engine's public methods."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt.parallel._base import Backend, Entry, sum_across, sumsq
from distopt.parallel._stats import counted_all_reduce

__all__ = ["ZeroBackend"]


class ZeroBackend(Backend):
    """A :class:`distopt.zero.ShardedModule`, or the :class:`~distopt.zero.ZeroEngine` that
    manages a set of parameters (``clip_grad_norm_(model.parameters())``)."""

    def __init__(self, model: nn.Module | None, engine: Any) -> None:
        super().__init__(model if model is not None else engine.module)
        self.engine = engine
        self.stage = engine.stage
        self.kind = f"zero{self.stage}"
        self.name = f"distopt ZeRO-{self.stage}"
        self.group = engine.group
        self.world = engine.world
        self.stats = engine.stats  # one counter with the engine's own collectives
        self._sharded_model = model
        self._reduce_every = False

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def data_parallel_world(self) -> int:
        # hybrid sharding: the shard group on each of the replicas
        return self.world * self.engine.replicas

    def all_reduce_counts(self, buf: Tensor) -> None:
        super().all_reduce_counts(buf)  # within the shard group
        if self.engine.replicas > 1:  # then across the replicas
            self.stats.add("all_reduce", buf.numel() * buf.element_size())
            dist.all_reduce(buf, group=self.engine.replicate_group)

    @property
    def rank(self) -> int:
        return self.engine.rank

    def named_params(self) -> list[tuple[str, Tensor]]:
        return [(name, p) for name, p, _, _, _ in self.engine.managed()]

    def entries(self, optimizer: Any = None) -> list[Entry]:
        eng = self.engine
        by_name = {m[0]: m for m in eng.managed()}
        out = []
        for name, p in self.module.named_parameters():
            m = by_name.get(name)
            if m is None:
                out.append(Entry(name, p, p, p.shape, None, eng.rank, eng.group))
            else:
                _, _, shard, shape, bounds = m
                out.append(Entry(name, p, shard, shape, bounds, eng.rank, eng.group))
        return out

    @property
    def reducer(self) -> Callable[[Tensor, Any], None]:
        return counted_all_reduce(self.stats)

    # ------------------------------------------------------------------ accumulation
    def check_accumulation(self, steps: int, reduce_every: bool) -> None:
        if reduce_every and self.stage != 2:
            raise ValueError(
                "GradientAccumulator: reduce_every_micro_batch needs distopt ZeRO stage 2 "
                "(stage 1 reduce-scatters the gradients once, at the boundary)"
            )
        self._reduce_every = reduce_every

    def context(self, sync: bool) -> AbstractContextManager[Any]:
        if sync or self._reduce_every:
            return nullcontext()
        return self.engine.no_sync()

    def sync_now(self) -> None:
        self.engine.reduce_gradients()

    def local_grads(self) -> list[Tensor]:
        return self.engine.shard_grads()  # stage 1: the one reduce-scatter of the window

    def grad_norm(self, params: Iterable[Tensor]) -> tuple[list[Tensor], Tensor]:
        # the reduced gradient rows live on the shards; the norm is summed across ranks
        shard_of = {id(p): shard for _, p, shard, _, _ in self.engine.managed()}
        self.engine.reduce_gradients()
        # parameters the engine does not manage here have no gradient (see engine_of)
        shards = [shard_of[id(p)] for p in params if id(p) in shard_of]
        grads = [t.grad for t in shards if t.grad is not None]
        local = sumsq(grads, self.device)
        self.stats.add("all_reduce", local.numel() * local.element_size())
        dist.all_reduce(local, group=self.group)
        return grads, local.sqrt()

    # ------------------------------------------------------------------ mid-window state
    def gather_grad_sum(self) -> dict[str, Tensor]:
        # Reducing early is harmless: later reductions of the window add into the same shards.
        eng = self.engine
        eng.reduce_gradients()
        names, fulls, mine = [], [], []
        for name, p, shard, shape, bounds in eng.managed():
            full = torch.zeros(shape, dtype=p.dtype, device=p.device)
            g = shard.grad
            s, e = bounds[eng.rank]
            if g is not None and e > s:
                rows = (full.view(1) if full.dim() == 0 else full)[s:e]
                rows.copy_(g.reshape(rows.shape).to(full.dtype))
                full.mul_(eng.world * eng.replicas)  # the shards hold averages over every rank
            names.append(name)
            fulls.append(full)
            mine.append(full if g is not None else None)
        sums = sum_across(mine, self.group, fulls, self.stats)
        return {n: t for n, t in zip(names, sums) if t is not None}

    def load_grad_sum(self, grads: dict[str, Tensor]) -> None:
        self.engine.zero_grad(set_to_none=True)
        super().load_grad_sum(grads)
        self.engine.adopt_full_grads()
