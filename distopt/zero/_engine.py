"""ZeRO-1 / ZeRO-2 engine: gradient reduce-scatter, shard bookkeeping, parameter all-gather.

The engine owns the partition plan and the flat communication buffers.  It changes the user's
optimizer in three ways only: the tensors in its param groups become the local row-shards of
the parameters, the optimizer is told which tensors are shards (``set_sharding``), and two step
hooks are registered (before the step: make sure the reduced gradient shards are in place;
after: all-gather the updated parameters).  The maths in the optimizer is untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt.optim._core import ShardSpec
from distopt.zero import _comm
from distopt.zero._plan import Bucket, Slot, make_plan

log = logging.getLogger("distopt.zero")


class ZeroEngine:
    """State shared by :class:`~distopt.zero.ShardedModule` and the sharded optimizer."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        stage: int,
        group: Any,
        bucket_mb: float,
        master_dtype: torch.dtype | None,
        broadcast_from_rank0: bool = True,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.stage = stage
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.master_dtype = master_dtype
        self.stats = _comm.CommStats()
        self.sync_enabled = True
        self.steps = 0

        opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = [(n, p) for n, p in module.named_parameters() if id(p) in opt_params]
        if len(named) != len(opt_params):
            model_ids = {id(p) for _, p in module.named_parameters()}
            missing = [
                f"group {gi} param {pi} shape {tuple(p.shape)}"
                for gi, g in enumerate(optimizer.param_groups)
                for pi, p in enumerate(g["params"])
                if id(p) not in model_ids
            ]
            raise ValueError(
                "distopt.shard: every optimizer parameter must be a parameter of the model; "
                f"not found in the model: {', '.join(missing[:10])}"
            )
        unmanaged = [n for n, p in module.named_parameters() if id(p) not in opt_params and p.requires_grad]
        if unmanaged:
            log.warning(
                "distopt.shard: %d trainable parameters are not in the optimizer and are not "
                "synchronised: %s", len(unmanaged), ", ".join(unmanaged[:8])
            )
        self.slots, self.buckets = make_plan(named, self.world, int(bucket_mb * 2**20))
        self._slot_of = {id(s.param): s for s in self.slots}

        if broadcast_from_rank0 and self.world > 1:
            self._broadcast_module()

        # the tensors the optimizer updates: views into the parameters, or fp32 master copies
        self.shards: list[Tensor] = []
        for s in self.slots:
            local = s.rows_view(s.param.detach(), self.rank)
            if master_dtype is not None and master_dtype != s.param.dtype:
                local = local.to(master_dtype).clone()
            self.shards.append(local)
        self._grad_out: list[Tensor | None] = [None] * len(self.buckets)
        self._grad_views: list[Tensor | None] = [None] * len(self.slots)
        self._pending = False  # full gradients exist that have not been reduced yet
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._reduced_in_backward: list[bool] = [False] * len(self.buckets)
        self._callback_queued = False

        self._install_into_optimizer()
        self._hooks = [
            s.param.register_post_accumulate_grad_hook(self._make_grad_hook(s))
            for s in self.slots
            if s.param.requires_grad
        ]

    # ------------------------------------------------------------------ set-up
    def _broadcast_module(self) -> None:
        """Make every rank start from rank 0's parameters and buffers (as DDP does)."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        tensors = [p.detach() for p in self.module.parameters()] + list(self.module.buffers())
        by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for (dtype, device), ts in by_kind.items():
            flat = torch.cat([t.reshape(-1) for t in ts]) if ts else torch.empty(0, dtype=dtype, device=device)
            _comm.broadcast(flat, src, self.group, None)
            off = 0
            with torch.no_grad():
                for t in ts:
                    n = t.numel()
                    t.copy_(flat[off : off + n].view_as(t))
                    off += n

    def _install_into_optimizer(self) -> None:
        opt = self.optimizer
        if len(opt.state) > 0 and any(len(v) for v in opt.state.values()):
            raise ValueError(
                "distopt.shard: the optimizer already has state; call distopt.shard before the "
                "first optimizer step (and load checkpoints with distopt.checkpoint afterwards)"
            )
        if not hasattr(opt, "set_sharding"):
            raise TypeError(
                f"distopt.shard needs a distopt optimizer (distopt.optim.*), got "
                f"{type(opt).__module__}.{type(opt).__name__}: its update cannot be told that it "
                "sees row shards (per-tensor statistics would be computed on a slice)"
            )
        if getattr(opt, "_needs_full_graph", False):
            raise ValueError(
                f"distopt.shard does not support {type(opt).__name__}: its Hessian-vector product "
                "needs the full parameters and the autograd graph on every rank; train it with DDP"
            )
        shard_of = {id(s.param): self.shards[s.index] for s in self.slots}
        for group in opt.param_groups:
            group["params"] = [shard_of[id(p)] for p in group["params"]]
        specs = {}
        for s in self.slots:
            start, end = s.bounds[self.rank]
            specs[self.shards[s.index]] = ShardSpec(s.shape, start, end - start, self.group)
        opt.set_sharding(specs)
        opt.register_step_pre_hook(lambda *_: self.before_step())
        opt.register_step_post_hook(lambda *_: self.after_step())
        opt._distopt_engine = self  # for distopt.checkpoint and shard_info

    # ------------------------------------------------------------------ gradients
    def _make_grad_hook(self, slot: Slot):
        def hook(param: Tensor) -> None:
            self._pending = True
            if self.stage != 2 or not self.sync_enabled:
                return
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            b = slot.bucket
            self._ready[b].add(slot.position)
            if len(self._ready[b]) == len(self.buckets[b].slots):
                self._reduce_bucket(self.buckets[b])
                self._reduced_in_backward[b] = True
                self._ready[b].clear()

        return hook

    def _end_of_backward(self) -> None:
        """Stage 2: reduce the buckets whose parameters did not all receive a gradient."""
        self._callback_queued = False
        for b in self.buckets:
            if self._ready[b.index] or (
                not self._reduced_in_backward[b.index] and any(s.param.grad is not None for s in b.slots)
            ):
                self._reduce_bucket(b)
            self._ready[b.index].clear()
            self._reduced_in_backward[b.index] = False
        self._pending = any(s.param.grad is not None for s in self.slots)

    def reduce_gradients(self) -> None:
        """Reduce-scatter every full gradient still held locally (stage 1; stage 2 leftovers)."""
        if not self._pending:
            return
        for b in self.buckets:
            self._reduce_bucket(b)
        self._pending = False

    def _reduce_bucket(self, b: Bucket) -> None:
        W, R = self.world, b.region
        inp = torch.zeros(W * R, dtype=b.dtype, device=b.device)
        regions = inp.view(W, R)
        for s in b.slots:
            g = s.param.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"distopt.shard: sparse gradient for {s.name} is not supported")
            for r in range(W):
                n = s.local_numel(r)
                if n:
                    regions[r, s.offsets[r] : s.offsets[r] + n].copy_(s.rows_view(g, r).reshape(-1))
            regions[:, b.payload + s.position] = 1.0
        inp.div_(W)  # average, as DDP does
        out = torch.empty(R, dtype=b.dtype, device=b.device)
        _comm.reduce_scatter(out, inp, self.group, self.stats)
        for s in b.slots:  # the full gradients have been handed over
            s.param.grad = None

        prev = self._grad_out[b.index]
        still_attached = prev is not None and any(
            self._grad_views[s.index] is not None and self.shards[s.index].grad is self._grad_views[s.index]
            for s in b.slots
        )
        if still_attached:
            prev.add_(out)
            out = prev
        self._grad_out[b.index] = out
        flags = out[b.payload :].tolist()
        for s in b.slots:
            shard = self.shards[s.index]
            if flags[s.position] > 0:
                n = s.local_numel(self.rank)
                view = out[s.offsets[self.rank] : s.offsets[self.rank] + n].view(shard.shape)
                if view.dtype != shard.dtype:
                    view = view.to(shard.dtype)
                shard.grad = view
                self._grad_views[s.index] = view
            else:
                shard.grad = None
                self._grad_views[s.index] = None

    # ------------------------------------------------------------------ step
    def before_step(self) -> None:
        known = {id(t) for t in self.shards}
        stray = [
            tuple(p.shape) for g in self.optimizer.param_groups for p in g["params"] if id(p) not in known
        ]
        if stray:
            raise ValueError(
                f"distopt.shard: {len(stray)} parameter(s) in the optimizer were added after "
                f"distopt.shard (shapes {stray[:5]}) and are not partitioned; add every param "
                "group (optimizer.add_param_group) before calling distopt.shard"
            )
        self.reduce_gradients()

    def after_step(self) -> None:
        self.steps += 1
        self.all_gather_params()

    @torch.no_grad()
    def all_gather_params(self) -> None:
        W = self.world
        for b in self.buckets:
            R = b.region
            inp = torch.zeros(R, dtype=b.dtype, device=b.device)
            for s in b.slots:
                n = s.local_numel(self.rank)
                if not n:
                    continue
                shard = self.shards[s.index]
                if shard.dtype != s.param.dtype:  # master copy -> model precision
                    s.rows_view(s.param.detach(), self.rank).copy_(shard)
                inp[s.offsets[self.rank] : s.offsets[self.rank] + n].copy_(shard.reshape(-1))
            if W == 1:
                continue
            out = torch.empty(W * R, dtype=b.dtype, device=b.device)
            _comm.all_gather(out, inp, self.group, self.stats)
            regions = out.view(W, R)
            for s in b.slots:
                full = s.param.detach()
                for r in range(W):
                    if r == self.rank:
                        continue
                    n = s.local_numel(r)
                    if n:
                        dst = s.rows_view(full, r)
                        dst.copy_(regions[r, s.offsets[r] : s.offsets[r] + n].view(dst.shape))

    # ------------------------------------------------------------------ misc
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


    @contextmanager
    def no_sync(self) -> Iterator[None]:
        prev = self.sync_enabled
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = prev

    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self.slots:
            shard = self.shards[s.index]
            if set_to_none:
                shard.grad = None
                s.param.grad = None
            else:
                if shard.grad is not None:
                    shard.grad.zero_()
                if s.param.grad is not None:
                    s.param.grad.zero_()
        self._pending = False

    def shard_info(self) -> dict[str, Any]:
        """Per-rank bytes of parameters, gradient shards and optimizer state, and traffic."""
        opt = self.optimizer
        state_bytes = 0
        replicated_state_bytes = 0
        for s in self.slots:
            st = opt.state.get(self.shards[s.index], {})
            for name, v in st.items():
                if isinstance(v, Tensor):
                    nb = v.numel() * v.element_size()
                    if hasattr(opt, "state_is_sharded") and not opt.state_is_sharded(name, v, s.shape):
                        replicated_state_bytes += nb
                    else:
                        state_bytes += nb
        local_numel = sum(s.local_numel(self.rank) for s in self.slots)
        total_numel = sum(s.rows * s.row_numel for s in self.slots)
        return {
            "rank": self.rank,
            "world_size": self.world,
            "stage": self.stage,
            "params_total": total_numel,
            "params_local": local_numel,
            "param_bytes_local": sum(
                s.local_numel(self.rank) * self.shards[s.index].element_size() for s in self.slots
            ),
            "state_bytes_local": state_bytes + replicated_state_bytes,
            "state_bytes_sharded": state_bytes,
            "state_bytes_replicated": replicated_state_bytes,
            "grad_shard_bytes": sum(
                t.numel() * t.element_size() for t in self._grad_out if t is not None
            ),
            "buckets": len(self.buckets),
            "comm": self.stats.as_dict(),
        }
