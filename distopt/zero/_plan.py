"""The partition plan: which rows of which parameter each rank owns, and the flat buckets.

Rows of every parameter (dim 0; a 0-dim parameter counts as one row) are split into ``world``
contiguous chunks whose sizes differ by at most one row.  Chunk ``j`` of parameter ``k`` goes to
rank ``(j + k) % world``, so the one-row remainders of small parameters are spread over ranks
instead of piling up on the last one.

Parameters are grouped into buckets (by dtype and device, in reverse registration order, which
is the order backward produces gradients) of at most ``bucket_bytes``.  A bucket's flat buffer
has one *region* per rank: the concatenation of that rank's rows of each parameter, padded to
the largest region, followed by one flag per parameter (1 if the rank had a gradient) and one
element that counts the ranks whose gradients in the bucket were not all finite.  The
region layout is what reduce-scatter and all-gather move in one call per bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Slot:
    """One managed parameter."""

    index: int  # position in the plan
    name: str  # fully qualified name in the model
    param: Tensor  # the full parameter (model's)
    shape: torch.Size
    rows: int
    row_numel: int
    bounds: list[tuple[int, int]]  # per rank: [start, end) rows
    bucket: int = -1
    offsets: list[int] = field(default_factory=list)  # per rank: offset inside the region
    position: int = -1  # index of this slot inside its bucket (flag position)

    def local_rows(self, rank: int) -> tuple[int, int]:
        return self.bounds[rank]

    def local_numel(self, rank: int) -> int:
        s, e = self.bounds[rank]
        return (e - s) * self.row_numel

    def rows_view(self, t: Tensor, rank: int) -> Tensor:
        """Rows of ``t`` (shaped like the parameter) that ``rank`` owns, as a view."""
        s, e = self.bounds[rank]
        if t.dim() == 0:
            return t.view(1)[s:e]
        return t[s:e]


@dataclass
class Bucket:
    index: int
    dtype: torch.dtype
    device: torch.device
    slots: list[Slot]
    region: int  # elements per rank region, flags included
    payload: int  # elements of the largest rank's rows (flags start here)

    @property
    def numel(self) -> int:
        return self.region


def split_rows(rows: int, world: int, rotate: int) -> list[tuple[int, int]]:
    """Per-rank [start, end) of ``rows`` rows in ``world`` balanced chunks, rotated."""
    edges = [(j * rows) // world for j in range(world + 1)]
    bounds: list[tuple[int, int]] = [(0, 0)] * world
    for j in range(world):
        bounds[(j + rotate) % world] = (edges[j], edges[j + 1])
    return bounds


def make_plan(
    named_params: list[tuple[str, Tensor]], world: int, bucket_bytes: int
) -> tuple[list[Slot], list[Bucket]]:
    """Build the slots (in the given order) and buckets (reverse order, split by dtype/device)."""
    slots: list[Slot] = []
    for k, (name, p) in enumerate(named_params):
        rows = p.shape[0] if p.dim() > 0 else 1
        row_numel = math.prod(p.shape[1:]) if p.dim() > 1 else 1
        if p.dim() > 0 and rows == 0:
            row_numel = 0
        slots.append(Slot(k, name, p, p.shape, rows, row_numel, split_rows(rows, world, k)))

    buckets: list[Bucket] = []
    current: list[Slot] = []
    current_bytes = 0

    def close() -> None:
        nonlocal current, current_bytes
        if not current:
            return
        b = len(buckets)
        sizes = [0] * world
        for pos, s in enumerate(current):
            s.bucket, s.position = b, pos
            s.offsets = []
            for r in range(world):
                s.offsets.append(sizes[r])
                sizes[r] += s.local_numel(r)
        payload = max(sizes)
        p0 = current[0].param
        # region: the rows, one flag per parameter, one non-finite count (see ZeroEngine)
        buckets.append(Bucket(b, p0.dtype, p0.device, current, payload + len(current) + 1, payload))
        current, current_bytes = [], 0

    for s in reversed(slots):
        nbytes = s.param.numel() * s.param.element_size()
        if current and (
            s.param.dtype != current[0].param.dtype
            or s.param.device != current[0].param.device
            or current_bytes + nbytes > bucket_bytes
        ):
            close()
        current.append(s)
        current_bytes += nbytes
    close()
    return slots, buckets
