"""Persistent communication buffers of the ZeRO engine, one per bucket, and their copy plans.

A bucket's flat buffer (``world`` regions of ``region`` elements, see ``_plan``) is allocated
once and reused by every reduction and every all-gather: no per-step allocation (on a CPU a
fresh multi-MiB buffer costs its page faults every step) and no zero fill (only the few
padding elements are cleared).  Every view the copies need into the buffer and into the
parameters is built once: filling a region from the gradients (their row chunks) and the
all-gather input from the updated rows are one ``torch.cat`` into the region each (a copy kernel
per region, not per chunk), the parameters from the all-gather output one
``torch._foreach_copy_``; the reduced rows the shards' ``.grad`` view are built once too.

How the collectives run depends on the backend:

* generic (NCCL and others): ``reduce_scatter_tensor`` over the regions in rank order, and an
  in-place ``all_gather_into_tensor`` whose input is this rank's region of the same buffer;
* gloo: gloo has no reduce-scatter (torch runs it as a clone of the whole buffer and an
  all-reduce of it) and its all-gather goes through a fresh temporary of the whole output.
  There the reduction is ``all_to_all_single``: each rank sends every other rank its region
  and sums the regions it receives into its own (the same bytes per rank as a ring
  reduce-scatter), and the all-gather is ``all_to_all_single`` of the own region to every
  other rank.  The buffer then holds the other ranks' regions in rank order, then this rank's
  own region last, so that the part sent is one contiguous slice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distopt.zero._plan import Bucket, Slot

# Whether gloo groups use the all-to-all collectives (tests switch it off to run the generic
# path, used on NCCL, on gloo as well).
GLOO_ALL_TO_ALL = True


def uses_all_to_all(group: Any, world: int) -> bool:
    """Whether the engine's collectives over ``group`` run as all-to-alls (gloo, see above)."""
    return GLOO_ALL_TO_ALL and world > 1 and dist.get_backend(group) == "gloo"


class BucketBuffers:
    """The flat buffers of one bucket and every view the engine copies through.

    Views into the parameters and the row shards are rebuilt when a parameter's or shard's
    storage changes (``module.to(...)``, ``rebind_shards``): :meth:`stale` compares data
    pointers, a few hundred nanoseconds per parameter.
    """

    def __init__(self, bucket: Bucket, rank: int, world: int, a2a: bool) -> None:
        self.bucket = bucket
        self.rank = rank
        self.world = world
        self.a2a = a2a
        W, R = world, bucket.region
        # one allocation: the flat buffer, then (gloo) the all-to-all output right after this
        # rank's own region, so that the own region and the regions received are one (W, R)
        # block that a single reduction over dim 0 sums (see sum_received)
        size = (2 * W - 1) * R if a2a else W * R
        self._mem = torch.zeros(size, dtype=bucket.dtype, device=bucket.device)
        self.flat = self._mem[: W * R]
        # this rank's reduced rows; the shards' .grad are views into it until the next reduction
        self.out = torch.empty(R, dtype=bucket.dtype, device=bucket.device)
        self.recv = self._mem[W * R :] if a2a else None
        if a2a:  # the other ranks' regions in rank order, then this rank's own
            self.pos = [r if r < rank else r - 1 for r in range(W)]
            self.pos[rank] = W - 1
            self._own_and_recv = self._mem[(W - 1) * R :].view(W, R)
        else:
            self.pos = list(range(W))
        self.regions = self.flat.view(W, R)  # row i: the region at position i
        self.own = self.regions[self.pos[rank]]
        sizes = [0] * W
        for s in bucket.slots:
            for r in range(W):
                sizes[r] = max(sizes[r], s.offsets[r] + s.local_numel(r))
        # padding after each rank's rows (the gloo all-gather leaves copies of the own rows there)
        self.pads = [
            self.regions[self.pos[r], sizes[r] : bucket.payload]
            for r in range(W)
            if sizes[r] < bucket.payload
        ]
        n = len(bucket.slots)
        self.flags = self.regions[:, bucket.payload : bucket.payload + n]  # (W, slots)
        self.count = self.regions[:, -1]  # (W,): ranks with non-finite gradients
        # per slot: the non-empty chunks of its rows in row order (numel) and which region
        # (position) takes each: a region is its rank's chunks in slot order, so it is filled
        # by one torch.cat over the chunks into its rows
        self.grad_sizes: list[list[int]] = []
        self._grad_pos: list[list[int]] = []
        for s in bucket.slots:
            owners = sorted((s.bounds[r][0], r) for r in range(W) if s.local_numel(r))
            self.grad_sizes.append([s.local_numel(r) for _, r in owners])
            self._grad_pos.append([self.pos[r] for _, r in owners])
        rank_at = {self.pos[r]: r for r in range(W)}
        self._rows_of_pos = [self.regions[i, : sizes[rank_at[i]]] for i in range(W)]
        self._zeros: Tensor | None = None  # chunks of a missing gradient are copied from here
        # per slot: this rank's reduced rows in ``out``, shaped as its row shard (built at first use)
        self.out_views: list[Tensor] | None = None
        self._key: tuple[int, ...] | None = None

    def nbytes(self) -> int:
        """Bytes of this bucket's persistent buffers."""
        return sum(t.numel() * t.element_size() for t in (self._mem, self.out))

    @staticmethod
    def _region_slice(regions: Tensor, pos: int, s: Slot, r: int) -> Tensor:
        return regions[pos, s.offsets[r] : s.offsets[r] + s.local_numel(r)]

    # ------------------------------------------------------------------ views into parameters
    def stale(self, shards: list[Tensor]) -> bool:
        key = tuple(s.param.data_ptr() for s in self.bucket.slots) + tuple(
            shards[s.index].data_ptr() for s in self.bucket.slots
        )
        if key == self._key:
            return False
        self._key = key
        return True

    def bind(self, shards: list[Tensor]) -> None:
        """(Re)build the views into the parameters: all-gather input and output copies."""
        W, rank = self.world, self.rank
        self.in_dsts: list[Tensor] = []
        self.in_srcs: list[Tensor] = []
        self.masters: list[tuple[Tensor, Tensor]] = []  # (param rows, master rows)
        self.out_dsts: list[Tensor] = []
        self.out_srcs: list[Tensor] = []
        gathered = self.recv.view(W - 1, self.bucket.region) if self.a2a else self.regions
        for s in self.bucket.slots:
            full = s.param.detach()
            n = s.local_numel(rank)
            if n:
                rows = s.rows_view(full, rank)
                self.in_dsts.append(
                    self._region_slice(self.regions, self.pos[rank], s, rank).view(rows.shape)
                )
                self.in_srcs.append(rows)
                shard = shards[s.index]
                if shard.dtype != full.dtype:
                    self.masters.append((rows, shard))
            for r in range(W):
                if r == rank or not s.local_numel(r):
                    continue
                dst = s.rows_view(full, r)
                self.out_dsts.append(dst)
                self.out_srcs.append(
                    self._region_slice(gathered, self.pos[r], s, r).view(dst.shape)
                )
        # contiguous rows (the usual case) go into the own region in one torch.cat
        self._in_cat = (
            [t.view(-1) for t in self.in_srcs]
            if self.in_srcs and all(t.is_contiguous() for t in self.in_srcs)
            else None
        )

    # ------------------------------------------------------------------ gradients in
    def fill(self, grads: list[Tensor | None]) -> None:
        """Copy the slots' gradients (None: no gradient here) into the regions, flags set.

        Each region is one ``torch.cat`` of its chunks (the gradients' row chunks are views):
        one copy kernel per region instead of one per chunk."""
        parts: list[list[Tensor]] = [[] for _ in range(self.world)]
        missing: list[int] = []
        dtype = self.flat.dtype
        for i, g in enumerate(grads):
            sizes = self.grad_sizes[i]
            if g is None:
                missing.append(i)
                chunks: Any = [self._zero_chunk(n) for n in sizes]
            elif not sizes:
                continue
            elif g.dtype == dtype and g.is_contiguous():
                chunks = g.view(-1).split_with_sizes(sizes)
            else:
                chunks = g.reshape(-1).to(dtype).split_with_sizes(sizes)
            for pos, c in zip(self._grad_pos[i], chunks):
                parts[pos].append(c)
        for pos, ps in enumerate(parts):
            if ps:
                torch.cat(ps, out=self._rows_of_pos[pos])
        if self.pads:
            torch._foreach_zero_(self.pads)
        self.flags.fill_(1.0)
        for i in missing:
            self.flags[:, i].zero_()

    def _zero_chunk(self, n: int) -> Tensor:
        """``n`` zeros (a view of one persistent buffer as long as the largest chunk)."""
        if self._zeros is None:
            most = max((m for sizes in self.grad_sizes for m in sizes), default=0)
            self._zeros = torch.zeros(most, dtype=self.flat.dtype, device=self.flat.device)
        return self._zeros[:n]

    # ------------------------------------------------------------------ collectives
    def send_part(self) -> Tensor:
        """What this rank sends in the all-to-all reduction: the other ranks' regions."""
        return self.flat[: (self.world - 1) * self.bucket.region]

    def splits(self) -> list[int]:
        s = [self.bucket.region] * self.world
        s[self.rank] = 0
        return s

    def sum_received(self, out: Tensor) -> None:
        """``out`` = this rank's own region plus the regions received (all-to-all reduction):
        one reduction over the (W, R) block they form in memory (an add for two ranks, which a
        CPU runs faster than a reduction over a dim of two)."""
        if self.world == 2:
            torch.add(self.own, self.recv, out=out)
        else:
            torch.sum(self._own_and_recv, dim=0, out=out)

    def gather_in(self) -> Tensor:
        """Copy this rank's updated rows into its region; the tensor to send in the all-gather."""
        for rows, master in self.masters:  # master copy -> model precision
            rows.copy_(master)
        if self._in_cat is not None:
            torch.cat(self._in_cat, out=self._rows_of_pos[self.pos[self.rank]])
        elif self.in_dsts:
            torch._foreach_copy_(self.in_dsts, self.in_srcs)
        if not self.a2a:
            return self.own
        W, R = self.world, self.bucket.region
        if W == 2:
            return self.own
        send = self.flat[: (W - 1) * R]
        send.view(W - 1, R).copy_(self.own.expand(W - 1, R))
        return send

    def gather_out(self) -> None:
        """Copy the other ranks' gathered rows into the parameters."""
        if self.out_dsts:
            torch._foreach_copy_(self.out_dsts, self.out_srcs)
