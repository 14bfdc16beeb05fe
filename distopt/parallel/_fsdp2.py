"""FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensor parameters sharded on dim 0."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from distopt._dtensor import is_dtensor, local_and_sharding, local_tensor
from distopt._torch_private import fsdp2_reduce_now
from distopt.parallel._base import Backend, Entry, chunk_bounds, sumsq

__all__ = ["FSDP2Backend", "dtensor_grad_norm"]


class FSDP2Backend(Backend):
    kind = "fsdp2"
    name = "FSDP2"

    def __init__(self, model: nn.Module, fsdp_modules: list[nn.Module]) -> None:
        super().__init__(model)
        self.kind = "fsdp2"
        names = {m: n for n, m in model.named_modules()}
        self.roots = [
            m
            for m in fsdp_modules
            if not any(
                names[m] != names[o] and (names[o] == "" or names[m].startswith(names[o] + "."))
                for o in fsdp_modules
            )
        ]
        self._reduce_every = False
        self.mesh = next((p.device_mesh for p in model.parameters() if is_dtensor(p)), None)
        self.world = self.mesh.size() if self.mesh is not None else 1
        self.group = (
            self.mesh.get_group() if self.mesh is not None and self.mesh.ndim == 1 else None
        )

    def entries(self, optimizer: Any = None) -> list[Entry]:
        out = []
        for name, p in self.module.named_parameters():
            if is_dtensor(p):
                _, sharded, group = local_and_sharding(p)
                if sharded:
                    world, r = dist.get_world_size(group), dist.get_rank(group)
                    out.append(
                        Entry(name, p, p, p.shape, chunk_bounds(p.shape[0], world), r, group)
                    )
                    continue
            out.append(Entry(name, p, p, p.shape, None, 0, None))
        return out

    # ------------------------------------------------------------------ accumulation
    def check_accumulation(self, steps: int, reduce_every: bool) -> None:
        if self.mesh is None:
            raise ValueError("GradientAccumulator: an FSDP2 model without DTensor parameters")
        if self.mesh.ndim != 1:
            raise NotImplementedError(
                "GradientAccumulator: FSDP2 on a multi-dimensional device mesh (HSDP) is not "
                "supported yet; use a 1-D mesh"
            )
        self._reduce_every = reduce_every

    def _set_sync(self, sync: bool) -> None:
        for m in self.roots:
            m.set_requires_gradient_sync(sync)

    @contextmanager
    def _ctx(self, sync: bool) -> Iterator[None]:
        self._set_sync(sync or self._reduce_every)
        try:
            yield
        finally:
            self._set_sync(True)

    def context(self, sync: bool) -> AbstractContextManager[Any]:
        return self._ctx(sync)

    def sync_now(self) -> None:
        self._set_sync(True)
        for m in self.roots:
            fsdp2_reduce_now(m)

    def grad_norm(self, params: Iterable[Tensor]) -> tuple[list[Tensor], Tensor]:
        return dtensor_grad_norm([p.grad for p in params if p.grad is not None])

    # ------------------------------------------------------------------ mid-window state
    def gather_grad_sum(self) -> dict[str, Tensor]:
        self.sync_now()
        out: dict[str, Tensor] = {}
        for n, p in self.model.named_parameters():
            g = p.grad
            if g is None:
                continue
            full = g.full_tensor() if is_dtensor(g) else g
            out[n] = full.detach().clone() * self.world  # FSDP2 holds averages
        return out

    def load_grad_sum(self, grads: dict[str, Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        for n, p in self.model.named_parameters():
            g = grads.get(n)
            if g is None:
                p.grad = None
                continue
            g = g.to(local_tensor(p).device, p.dtype) / self.world
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if is_dtensor(p) else g


def dtensor_grad_norm(grads: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Global L2 norm of gradients some of which are DTensors: local partial sums, one
    all-reduce per process group; returns the local tensors clipping scales, and the norm
    (a tensor on the gradients' device: nothing is read back to the host)."""
    locals_ = [local_tensor(g) for g in grads]
    device = locals_[0].device if locals_ else None
    per_group: dict[Any, list[Tensor]] = {}
    plain: list[Tensor] = []
    for g, local in zip(grads, locals_):
        if is_dtensor(g):
            _, sharded, pg = local_and_sharding(g)
            if sharded:
                per_group.setdefault(pg, []).append(local)
                continue
        plain.append(local)
    total_sq = sumsq(plain, device)
    for pg, tensors in per_group.items():
        s = sumsq(tensors, device)
        dist.all_reduce(s, group=pg)
        total_sq = total_sq + s.to(total_sq.device)
    return locals_, total_sq.sqrt()
