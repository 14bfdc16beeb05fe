"""The parameter side of the ZeRO engine: the all-gather of the updated rows after each step,
master rows that follow writes to the parameters, and row views rebound after ``module.to``.

:class:`ParameterSync` is a part of :class:`~distopt.zero._engine.ZeroEngine` (its base class),
kept in its own module; it uses the engine's plan, shards, buffers and group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from distopt._torch_private import version_of
from distopt.zero import _comm

if TYPE_CHECKING:
    from torch import Tensor

    from distopt.zero._buffers import BucketBuffers
    from distopt.zero._comm import CommStats
    from distopt.zero._plan import Bucket, Slot


class ParameterSync:
    """All-gather and master-row bookkeeping of :class:`~distopt.zero._engine.ZeroEngine`."""

    # set by ZeroEngine.__init__
    optimizer: torch.optim.Optimizer
    group: Any
    rank: int
    world: int
    master_dtype: torch.dtype | None
    slots: list[Slot]
    buckets: list[Bucket]
    shards: list[Tensor]
    stats: CommStats
    _a2a: bool
    _versions: dict[int, int]

    def _buffers_of(self, b: Bucket, bind: bool = True) -> BucketBuffers:
        raise NotImplementedError  # ZeroEngine's

    # master rows follow writes to the parameters -----------------------------------------
    def _record_versions(self) -> None:
        # engine master rows, and bf16/fp16 row views whose fp32 master the optimizer keeps
        self._versions = {
            s.index: version_of(s.param)
            for s in self.slots
            if self._has_master(s) or s.param.dtype in (torch.float16, torch.bfloat16)
        }

    def _has_master(self, s: Slot) -> bool:
        return self.shards[s.index].dtype != s.param.dtype

    @torch.no_grad()
    def _refresh_masters(self) -> None:
        """Copy parameter rows written since the engine's last write into the master rows.

        ``model.load_state_dict``, ``p.copy_`` and every other in-place write bump a tensor's
        version counter; the all-gather after each step is the engine's own write.
        """
        if not self._versions:
            return
        stale = []
        for s in self.slots:
            v = self._versions.get(s.index)
            if v is not None and version_of(s.param) != v:
                if self._has_master(s):
                    self.shards[s.index].copy_(s.rows_view(s.param.detach(), self.rank))
                else:  # a bf16/fp16 row view: the optimizer keeps its fp32 master
                    stale.append(self.shards[s.index])
        inner = self.optimizer
        while getattr(inner, "base_optimizer", None) is not None:  # Lookahead(<base>)
            inner = inner.base_optimizer
        if stale and hasattr(inner, "refresh_masters"):
            inner.refresh_masters(stale)
        self._record_versions()

    @torch.no_grad()
    def all_gather_params(self) -> None:
        """All-gather the updated rows into every rank's full parameters, bucket by bucket.

        Every bucket's all-gather is launched (into its persistent buffer) before the first one
        is waited, and each bucket's rows are copied out as soon as it arrives, so copies
        overlap communication.
        """
        pending: list[tuple[BucketBuffers, Any]] = []
        for b in self.buckets:
            buf = self._buffers_of(b)
            send = buf.gather_in()
            if self.world == 1:
                continue
            if self._a2a:
                work = _comm.all_to_all(
                    buf.recv, send, buf.splits(), self.group, None, async_op=True
                )
                self.stats.add("all_gather", buf.flat.numel() * buf.flat.element_size())
            else:
                work = _comm.all_gather(buf.flat, send, self.group, self.stats, async_op=True)
            pending.append((buf, work))
        for buf, work in pending:
            work.wait()
            buf.gather_out()
        self._record_versions()

    @torch.no_grad()
    def rebind_shards(self) -> None:
        """Point the row views at the parameters' current storage (after ``module.to(...)``)."""
        for s in self.slots:
            shard = self.shards[s.index]
            view = s.rows_view(s.param.detach(), self.rank)
            if self.master_dtype is not None and self.master_dtype != s.param.dtype:
                if shard.device != view.device:
                    shard.data = shard.data.to(view.device)
                continue
            if shard.dtype != view.dtype:
                raise ValueError(
                    f"distopt.shard: {s.name} changed dtype to {view.dtype} after sharding; the "
                    f"optimizer's rows are {shard.dtype} (use master_dtype= for mixed precision)"
                )
            shard.set_(view)
        self._record_versions()
