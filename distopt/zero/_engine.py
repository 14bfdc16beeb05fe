"""ZeRO-1 / ZeRO-2 engine: gradient reduce-scatter, shard bookkeeping, parameter all-gather.

The engine owns the partition plan and the flat communication buffers.  It changes the user's
optimizer in three ways only: the tensors in its param groups become the local row-shards of
the parameters, the optimizer is told which tensors are shards (``set_sharding``), and two step
hooks are registered (before the step: make sure the reduced gradient shards are in place;
after: all-gather the updated parameters).  The maths in the optimizer is untouched.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt._torch_private import queue_end_of_backward
from distopt.optim._core import ShardSpec
from distopt.zero import _comm
from distopt.zero._buffers import BucketBuffers, uses_all_to_all
from distopt.zero._params import ParameterSync
from distopt.zero._plan import Bucket, Slot, make_plan

log = logging.getLogger("distopt.zero")

# Which engine manages a parameter (id -> weak reference): a parameter belongs to at most one
# live engine, and ``distopt.clip_grad_norm_(model.parameters())`` finds its shards through it.
_OWNER: dict[int, weakref.ReferenceType[ZeroEngine]] = {}


def engine_of(params: Iterable[Tensor]) -> ZeroEngine | None:
    """The live engine that manages every tensor of ``params``, or None if none does.

    Raises ValueError for a mix of managed and unmanaged tensors, or of two engines.
    """
    engines = set()
    for p in params:
        ref = _OWNER.get(id(p))
        eng = ref() if ref is not None else None
        if eng is not None and not eng.retired and id(p) in eng._slot_of:
            engines.add(eng)
        elif p.grad is not None:  # an unmanaged parameter with a gradient of its own
            engines.add(None)
        # an unmanaged parameter without a gradient (a frozen layer) has nothing to clip
    if not engines or engines == {None}:
        return None
    if len(engines) > 1:
        raise ValueError(
            "distopt.clip_grad_norm_: the parameters given are partly managed by distopt.shard and "
            "partly not (or by two different shard calls); their gradients live in different "
            "places, so no single global norm can be computed. Pass the sharded model, or "
            "parameters of one distopt.shard call only."
        )
    return engines.pop()


class ZeroEngine(ParameterSync):
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
        replicate_group: Any = None,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.stage = stage
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # hybrid sharding: the shards are replicated over ``replicate_group`` (the ranks that hold
        # the same rows in the other shard groups, e.g. the same local rank on every node); only
        # this rank's reduced rows of each gradient bucket are all-reduced across it
        self.replicate_group = replicate_group
        self.replicas = 1 if replicate_group is None else dist.get_world_size(replicate_group)
        self.master_dtype = master_dtype
        self.stats = _comm.CommStats()
        self.sync_enabled = True
        self.steps = 0
        self.retired = False
        self._warned_parameters = False

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
        unmanaged = [
            n for n, p in module.named_parameters() if id(p) not in opt_params and p.requires_grad
        ]
        if unmanaged:
            log.warning(
                "distopt.shard: %d trainable parameters are not in the optimizer and are not "
                "synchronised: %s",
                len(unmanaged),
                ", ".join(unmanaged[:8]),
            )
        self.slots, self.buckets = make_plan(named, self.world, int(bucket_mb * 2**20))
        self._slot_of = {id(s.param): s for s in self.slots}
        self._claim_parameters()

        if broadcast_from_rank0 and self.world * self.replicas > 1:
            self._broadcast_module()

        # the tensors the optimizer updates: views into the parameters, or fp32 master copies
        self.shards: list[Tensor] = []
        for s in self.slots:
            local = s.rows_view(s.param.detach(), self.rank)
            if master_dtype is not None and master_dtype != s.param.dtype:
                local = local.to(master_dtype).clone()
            self.shards.append(local)
        self._grad_out: list[Tensor | None] = [None] * len(self.buckets)
        # persistent flat buffers per bucket (built at first use), and whether the collectives
        # run as all-to-alls (gloo: see distopt.zero._buffers)
        self._buffers: list[BucketBuffers | None] = [None] * len(self.buckets)
        self._a2a = uses_all_to_all(group, self.world)
        # per bucket, the number of slots that must get a gradient before it is reduced (stage 2;
        # counted once per backward, as requires_grad may change between steps)
        self._expected: list[int] | None = None
        self._pending = False  # full gradients may exist that have not been reduced yet
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._next_bucket = 0  # buckets are reduced strictly in index order, on every rank
        self._callback_queued = False
        # count (a device tensor) of ranks with non-finite gradients in this reduction, or None
        self._nonfinite: Tensor | None = None
        # launched reduce-scatters not yet applied: (bucket, buffers, output, work, positions of
        # the local gradients or None when the flags must be read to know which shards get rows,
        # whether the average is still to be taken)
        self._inflight: list[tuple[Bucket, BucketBuffers, Tensor, Any, set[int] | None, bool]] = []
        # master rows follow writes to the parameters: the version each parameter had when the
        # engine last wrote it (see _refresh_masters)
        self._versions: dict[int, int] = {}
        self._record_versions()

        self._install_into_optimizer()
        self._hooks = [
            s.param.register_post_accumulate_grad_hook(self._make_grad_hook(s))
            for s in self.slots
            if s.param.requires_grad
        ]
        # gradients left by DDP-style code before sharding, or handed back by a retired engine
        self._pending = any(s.param.grad is not None for s in self.slots)

    # ------------------------------------------------------------------ set-up
    def _broadcast_module(self) -> None:
        """Make every rank start from rank 0's parameters and buffers (as DDP does).

        Hybrid: first across each replicate group, then within each shard group from its first
        rank (for a (replicate, shard) mesh, the first ranks of all shard groups form the
        replicate group of global rank 0).
        """
        if self.replicas > 1:
            self._broadcast_tensors(self.replicate_group)
        if self.world > 1:
            self._broadcast_tensors(self.group)

    def _broadcast_tensors(self, group: Any) -> None:
        src = dist.get_global_rank(group, 0) if group is not None else 0
        tensors = [p.detach() for p in self.module.parameters()] + list(self.module.buffers())
        by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for (dtype, device), ts in by_kind.items():
            flat = (
                torch.cat([t.reshape(-1) for t in ts])
                if ts
                else torch.empty(0, dtype=dtype, device=device)
            )
            _comm.broadcast(flat, src, group, None)
            off = 0
            with torch.no_grad():
                for t in ts:
                    n = t.numel()
                    t.copy_(flat[off : off + n].view_as(t))
                    off += n

    def _claim_parameters(self) -> None:
        """Make this engine the only one managing its parameters (a second shard call wins)."""
        previous = set()
        for s in self.slots:
            ref = _OWNER.get(id(s.param))
            eng = ref() if ref is not None else None
            if (
                eng is not None
                and eng is not self
                and not eng.retired
                and id(s.param) in eng._slot_of
            ):
                previous.add(eng)
        for eng in previous:
            log.info(
                "distopt.shard: parameters already sharded by an earlier distopt.shard call are "
                "taken over by the new one; the earlier optimizer can no longer step"
            )
            eng.retire()
        me = weakref.ref(self)
        for s in self.slots:
            _OWNER[id(s.param)] = me

    def retire(self) -> None:
        """Detach this engine from the parameters (after another ``distopt.shard`` took them over).

        Its hooks are removed and its optimizer's ``step`` raises.  Gradients it holds are
        handed back to the parameters' ``.grad`` (as DDP would still have them): this rank's
        reduced rows, times the world size, added into the rows it owns, so that the next
        reduction (the averaging of every rank's contribution) gives the same rows back.
        """
        if self.retired:
            return
        self._wait_inflight()
        self.retired = True
        for h in self._hooks:
            h.remove()
        self._hooks = []
        with torch.no_grad():
            for s in self.slots:
                g = self.shards[s.index].grad
                if g is None:
                    continue
                if s.param.grad is None:
                    s.param.grad = torch.zeros_like(s.param)
                rows = s.rows_view(s.param.grad, self.rank)
                rows.add_(g.reshape(rows.shape).to(rows.dtype), alpha=self.world)
                self.shards[s.index].grad = None
        for s in self.slots:
            if _OWNER.get(id(s.param)) is not None and _OWNER[id(s.param)]() is self:
                del _OWNER[id(s.param)]

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
        # optimizer.zero_grad() clears the full gradients of a no_sync window too, as under DDP
        inner = opt
        while getattr(inner, "base_optimizer", None) is not None:  # Lookahead(<base>)
            inner = inner.base_optimizer
        if hasattr(inner, "register_zero_grad_post_hook"):
            inner.register_zero_grad_post_hook(
                lambda _o, set_to_none: self.clear_full_grads(set_to_none)
            )
        # Lookahead.sync_lookahead() outside step: every rank gets the synchronised rows
        if hasattr(opt, "register_sync_post_hook"):
            opt.register_sync_post_hook(lambda *_: self._after_external_update())

    # ------------------------------------------------------------------ gradients
    # The contract (the one DDP keeps): every rank reduces every bucket exactly once per
    # synchronised backward, in bucket-index order, whatever got gradients where.  Stage 2
    # reduces a bucket during backward as soon as it and every bucket before it are complete on
    # this rank; the end-of-backward callback reduces the rest.  Stage 1 reduces everything in
    # that callback.  The reduced rows *add into* the shards' ``.grad`` (as ``.grad`` accumulates
    # under DDP), and the shards' ``.grad`` are what the user and the optimizer see and zero.
    def _make_grad_hook(self, slot: Slot):
        def hook(param: Tensor) -> None:
            self._pending = True
            if not self.sync_enabled:
                return
            self._queue_end_of_backward()
            if self.stage != 2:
                return
            self._ready[slot.bucket].add(slot.position)
            if slot.bucket != self._next_bucket:
                return  # an earlier bucket is not complete yet
            if self._expected is None:
                self._expected = [
                    sum(1 for s in b.slots if s.param.requires_grad) for b in self.buckets
                ]
            nb, expected, ready = len(self.buckets), self._expected, self._ready
            while self._next_bucket < nb and 0 < expected[self._next_bucket] <= len(
                ready[self._next_bucket]
            ):
                self._reduce_bucket(self.buckets[self._next_bucket])
                self._next_bucket += 1

        return hook

    def _queue_end_of_backward(self) -> None:
        """Called from inside a backward pass (gradient hooks, the model output's hook)."""
        if self.sync_enabled and not self._callback_queued and not self.retired:
            self._callback_queued = True
            queue_end_of_backward(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        for b in self.buckets[self._next_bucket :]:
            self._reduce_bucket(b)
        self._finish_reduction()

    def _finish_reduction(self) -> None:
        self._wait_inflight()
        self._next_bucket = 0
        self._expected = None
        for r in self._ready:
            r.clear()
        self._pending = False
        self._poison_gradients()

    def reduce_gradients(self) -> None:
        """Reduce-scatter every full gradient still held locally (after a ``no_sync`` window)."""
        if not self._pending:
            return
        for b in self.buckets:
            self._reduce_bucket(b)
        self._finish_reduction()

    def _buffers_of(self, b: Bucket, bind: bool = True) -> BucketBuffers:
        """Bucket ``b``'s persistent buffers; ``bind``: with their views into the parameters
        current (the all-gather needs them; the reduction only copies gradients in)."""
        buf = self._buffers[b.index]
        if buf is None:
            buf = self._buffers[b.index] = BucketBuffers(b, self.rank, self.world, self._a2a)
        if bind and buf.stale(self.shards):
            buf.bind(self.shards)
        return buf

    def _reduce_bucket(self, b: Bucket) -> None:
        """Launch bucket ``b``'s reduce-scatter (asynchronously: backward goes on meanwhile).

        The result is applied to the shards' ``.grad`` by :meth:`_wait_inflight`, which the
        end-of-backward callback (and every other place that needs the reduced rows) calls.
        """
        W = self.world
        buf = self._buffers_of(b, bind=False)
        grads = []
        for s in b.slots:
            g = s.param.grad
            if g is not None and g.is_sparse:
                raise RuntimeError(f"distopt.shard: sparse gradient for {s.name} is not supported")
            grads.append(g)
        buf.fill(grads)
        inp = buf.flat
        # one count, in every rank's region, of the ranks whose gradients here are not finite
        buf.count.copy_(~torch.isfinite(inp.sum(dtype=torch.float32)))
        low = inp.dtype in (torch.float16, torch.bfloat16)
        if low:  # average before the sum, as DDP does (a low-precision sum could overflow)
            inp.div_(W * self.replicas)
        # the reduced rows land in the bucket's persistent output, which the shards' .grad view
        # until the next reduction (as DDP's gradient_as_bucket_view); gradients still held from
        # an earlier reduction (accumulation without zero_grad) keep theirs: a fresh one here
        held = any(self.shards[s.index].grad is not None for s in b.slots)
        out = torch.empty(b.region, dtype=b.dtype, device=b.device) if held else buf.out
        if self._a2a:
            splits = buf.splits()
            self.stats.add("reduce_scatter", inp.numel() * inp.element_size())
            work = _comm.all_to_all(
                buf.recv, buf.send_part(), splits, self.group, None, async_op=True
            )
        else:
            work = _comm.reduce_scatter(out, inp, self.group, self.stats, async_op=W > 1)
        for s in b.slots:  # the full gradients have been handed over
            s.param.grad = None
        # no read is needed when every parameter that can get a gradient got one here (one that
        # does not require grad gets none on any rank: DDP too assumes requires_grad agrees)
        have = {s.position for s, g in zip(b.slots, grads) if g is not None}
        known = len(have) == len(b.slots) or all(
            s.position in have or not s.param.requires_grad for s in b.slots
        )
        self._inflight.append((b, buf, out, work, have if known else None, not low))

    def _wait_inflight(self) -> None:
        """Wait for the launched reduce-scatters, in launch order, and add their rows into the
        shards' ``.grad``."""
        while self._inflight:
            b, buf, out, work, local, divide = self._inflight.pop(0)
            if work is not None:
                work.wait()
            if self._a2a:
                buf.sum_received(out)
            if self.replicas > 1:  # hybrid: only this rank's rows cross to the other replicas
                self.stats.add("replicate_all_reduce", out.numel() * out.element_size())
                dist.all_reduce(out, group=self.replicate_group)
            if divide:  # average over every rank, as DDP does
                out.div_(self.world * self.replicas)
            self._apply_rows(b, out, local, buf)

    def _apply_rows(
        self, b: Bucket, out: Tensor, local: set[int] | None, buf: BucketBuffers
    ) -> None:
        self._grad_out[b.index] = out
        # the count of ranks with non-finite gradients stays on the device (summed over buckets)
        count = out[-1:]
        self._nonfinite = count.clone() if self._nonfinite is None else self._nonfinite + count
        if local is not None:  # this rank had every gradient there is: no need to ask
            got = {s.position: s.position in local for s in b.slots}
        else:  # some slot had no gradient here; whether another rank had one is on the device
            flags = out[b.payload : b.payload + len(b.slots)].tolist()
            got = {i: f > 0 for i, f in enumerate(flags)}
        if out is buf.out:  # the persistent output: its row views are built once
            if buf.out_views is None:
                buf.out_views = [self._rows_in(out, s) for s in b.slots]
            views = buf.out_views
        else:
            views = [self._rows_in(out, s) for s in b.slots]
        for s in b.slots:
            if not got[s.position]:
                continue  # no rank had a gradient: the shard's .grad stays as it is (None or kept)
            shard = self.shards[s.index]
            rows = views[s.position]
            if shard.grad is None:
                shard.grad = rows if rows.dtype == shard.dtype else rows.to(shard.dtype)
            else:
                shard.grad.add_(rows.to(shard.grad.dtype))

    def _rows_in(self, out: Tensor, s: Slot) -> Tensor:
        """This rank's rows of slot ``s`` in a bucket's reduced output, shaped as its shard."""
        start = s.offsets[self.rank]
        return out[start : start + s.local_numel(self.rank)].view(self.shards[s.index].shape)

    def _poison_gradients(self) -> None:
        """If some rank had a non-finite gradient, make sure this rank's rows show one too.

        ``torch.amp.GradScaler`` decides from the gradients in the param groups (this rank's
        rows) whether to skip the step, and an overflow lands in one owner's rows only; every
        bucket's reduce-scatter also counts the ranks with non-finite gradients, so every rank
        knows, and a rank whose rows are finite gets a NaN in one element.  The decision, and so
        the scale, is the same on every rank, as under DDP.  Done on the device (no host read):
        the first element of this rank's first gradient becomes NaN when the count is positive.
        """
        count, self._nonfinite = self._nonfinite, None
        if count is None:
            return
        for t in self.shards:
            if t.grad is not None and t.grad.numel():
                t.grad.view(-1)[:1].masked_fill_(count.to(t.grad.device) > 0, float("nan"))
                return

    def holds_reduced_grads(self) -> bool:
        """Whether reduced gradient rows are waiting in the shards' ``.grad`` (before the step)."""
        return any(t.grad is not None for t in self.shards)

    def clear_full_grads(self, set_to_none: bool = True) -> None:
        """Clear the full local gradients not yet reduced (``optimizer.zero_grad()`` calls it)."""
        for s in self.slots:
            if s.param.grad is None:
                continue
            if set_to_none:
                s.param.grad = None
            else:
                s.param.grad.zero_()
        self._pending = False

    # ------------------------------------------------------------------ step
    def _check_live(self) -> None:
        if self.retired:
            raise RuntimeError(
                "distopt.shard: this optimizer's parameters were sharded again by a later "
                "distopt.shard call, which now owns their gradients; step the optimizer returned "
                "by that call"
            )

    def before_step(self) -> None:
        self._check_live()
        known = {id(t) for t in self.shards}
        stray = [
            tuple(p.shape)
            for g in self.optimizer.param_groups
            for p in g["params"]
            if id(p) not in known
        ]
        if stray:
            raise ValueError(
                f"distopt.shard: {len(stray)} parameter(s) in the optimizer were added after "
                f"distopt.shard (shapes {stray[:5]}) and are not partitioned; add every param "
                "group (optimizer.add_param_group) before calling distopt.shard"
            )
        self._refresh_masters()
        self.reduce_gradients()

    def after_step(self) -> None:
        self.steps += 1
        self.all_gather_params()

    def _after_external_update(self) -> None:
        """The shards were changed outside ``step`` (``Lookahead.sync_lookahead``)."""
        self._check_live()
        self.all_gather_params()

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

    # ------------------------------------------------------------------ public accessors
    # What the rest of distopt (distopt.parallel's ZeRO backend) may ask the engine; nothing
    # outside distopt.zero reads the engine's attributes directly.
    def managed(self) -> list[tuple[str, Tensor, Tensor, torch.Size, list[tuple[int, int]]]]:
        """One ``(name, parameter, row shard, global shape, rows of every rank)`` per managed
        parameter, in plan order; the row shard is the tensor the optimizer updates."""
        return [
            (s.name, s.param, self.shards[s.index], s.shape, list(s.bounds)) for s in self.slots
        ]

    def shard_grads(self) -> list[Tensor]:
        """The reduced gradient rows this rank holds (reduce any pending full gradients first)."""
        self.reduce_gradients()
        return [t.grad for t in self.shards if t.grad is not None]

    def adopt_full_grads(self) -> None:
        """Full gradients were written into the parameters' ``.grad`` outside a backward pass
        (an accumulator resuming mid-window): reduce them with the next reduction."""
        self._pending = any(s.param.grad is not None for s in self.slots)

    def shard_info(self) -> dict[str, Any]:
        """Per-rank bytes of parameters, gradient shards and optimizer state, and traffic."""
        from distopt.zero._info import shard_info

        return shard_info(self)
