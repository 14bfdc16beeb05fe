"""``DistributedDataParallel``: full gradients averaged by DDP's reducer on every rank."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt.parallel._base import Backend, sum_across

__all__ = ["DDPBackend"]


class DDPBackend(Backend):
    kind = "ddp"
    name = "DistributedDataParallel"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.kind = "ddp"
        self.group = model.process_group
        self.world = dist.get_world_size(self.group)

    @property
    def module(self) -> nn.Module:
        return self.model.module

    def check_accumulation(self, steps: int, reduce_every: bool) -> None:
        if reduce_every:
            raise ValueError(
                "GradientAccumulator: reduce_every_micro_batch applies to sharded gradients "
                "(distopt ZeRO-2, FSDP2); DDP keeps full gradients either way, so syncing every "
                "micro-batch would only add traffic"
            )

    def context(self, sync: bool) -> AbstractContextManager[Any]:
        return nullcontext() if sync else self.model.no_sync()

    def sync_now(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        sums = sum_across([p.grad for p in params], self.group, params, self.stats)
        with torch.no_grad():
            for p, s in zip(params, sums):
                if s is not None:
                    s.div_(self.world)  # average, as DDP does
                    if p.grad is None:
                        p.grad = s
                    else:
                        p.grad.copy_(s)

    def gather_grad_sum(self) -> dict[str, Tensor]:
        named = [(n, p) for n, p in self.named_params() if p.requires_grad]
        sums = sum_across([p.grad for _, p in named], self.group, [p for _, p in named], self.stats)
        return {n: s for (n, _), s in zip(named, sums) if s is not None}
