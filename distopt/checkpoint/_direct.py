"""The save plan distopt hands DCP, and the direct read of a tensor's bytes on load.

Save: :class:`SavePlanner` is DCP's default planner with two changes.

* A tensor complete on several ranks (a replicated parameter) is written by one of them; DCP's
  default picks, item by item, the rank with the fewest bytes planned *so far*, counting rank
  0's own rows before any other rank's are seen, so with ZeRO-sharded state the last rank
  ends up writing about twice the bytes of the first (25M parameters, 2 ranks: 103 MB vs
  204 MB).  Here every rank's own rows are counted first and the replicated tensors go, the
  largest first, to the rank with the fewest bytes: every rank writes about the same.
* It records which tensors it hands DCP are contiguous (row-major, so that the bytes
  ``torch.save`` writes for them are the tensor's elements in order): the commit marker lists
  those items (``rowmajor``: their offsets in each file).

Load: :func:`read_direct` reads such an item's tensor bytes straight into the tensor they
belong to (the target itself when the item is exactly the target, as on a load at the saved
layout) instead of ``torch.load`` of the item plus a copy: ``torch.load`` of a small item costs
far more than its bytes (zip and pickle parsing), and DCP's checkpoints hold hundreds of small
items (biases, norms, step counters).  Every byte of the item is still checked against its
CRC32 segments; anything unexpected falls back to ``torch.load`` of the checked bytes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import zipfile
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlan

Segments = list[list[int]]

_ZIP_LOCAL = struct.Struct("<4s22xHH")  # local file header: signature ... name, extra lengths


class SavePlanner(DefaultSavePlanner):
    """DCP's default save planner, writing each replicated tensor once with the bytes balanced
    over the ranks, and recording which tensors are contiguous (``row_major``)."""

    def __init__(self) -> None:
        super().__init__()
        self.row_major: dict[Any, bool] = {}

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Any]:
        return super().create_global_plan(balance_replicated(all_plans))

    def resolve_data(self, write_item: Any) -> Any:
        data = super().resolve_data(write_item)
        if isinstance(data, torch.Tensor):
            self.row_major[write_item.index] = data.is_contiguous() and data.numel() > 0
        return data


def balance_replicated(all_plans: list[SavePlan]) -> list[SavePlan]:
    """Each item listed by several plans kept in one of them: every plan's own items counted
    first, then the shared ones, largest first, to the plan with the fewest bytes (ties: the
    lowest rank)."""
    holders: dict[Any, list[int]] = {}
    size: dict[Any, int] = {}
    for r, plan in enumerate(all_plans):
        for item in plan.items:
            holders.setdefault(item.index, []).append(r)
            size[item.index] = item.tensor_storage_size() or 1
    load = [0] * len(all_plans)
    for idx, rs in holders.items():
        if len(rs) == 1:
            load[rs[0]] += size[idx]
    keep: dict[Any, int] = {}
    shared = sorted((i for i, rs in holders.items() if len(rs) > 1), key=lambda i: -size[i])
    for idx in shared:
        r = min(holders[idx], key=lambda q: (load[q], q))
        load[r] += size[idx]
        keep[idx] = r
    return [
        dataclasses.replace(plan, items=[it for it in plan.items if keep.get(it.index, r) == r])
        for r, plan in enumerate(all_plans)
    ]


class ItemError(Exception):
    """A direct read found damage: the message says where (the caller names the file)."""


def _pread_exact(fd: int, n: int, off: int) -> bytes:
    data = os.pread(fd, n, off)
    while len(data) < n:
        more = os.pread(fd, n - len(data), off + len(data))
        if not more:
            raise ItemError(f"is truncated: it ends at byte {off + len(data)}, an item needs "
                            f"bytes up to {off + n}")  # fmt: skip
        data += more
    return data


def _readinto_exact(fd: int, out: memoryview, off: int) -> None:
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got:]], off + got)
        if n <= 0:
            raise ItemError(f"is truncated: it ends at byte {off + got}, an item needs bytes "
                            f"up to {off + len(out)}")  # fmt: skip
        got += n


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _data_start(blob: bytes, nbytes: int) -> int | None:
    """Where the tensor's bytes start in one ``torch.save``d tensor (``blob``: the whole item),
    found from the zip directory; None if the item is not laid out as expected."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            infos = [i for i in zf.infolist() if i.filename.endswith("/data/0")]
    except (zipfile.BadZipFile, ValueError, OSError):
        return None
    if len(infos) != 1:
        return None
    zi = infos[0]
    if zi.compress_type != zipfile.ZIP_STORED or zi.file_size != nbytes:
        return None
    h = zi.header_offset
    if h + _ZIP_LOCAL.size > len(blob):
        return None
    sig, name_len, extra_len = _ZIP_LOCAL.unpack_from(blob, h)
    start = h + _ZIP_LOCAL.size + name_len + extra_len
    if sig != b"PK\x03\x04" or start + nbytes > len(blob):
        return None
    return start


def read_direct(
    fd: int,
    off: int,
    length: int,
    segs: Segments,
    crc32: Any,
    sizes: tuple[int, ...],
    dtype: torch.dtype,
    dest: torch.Tensor | None,
    big_min: int,
) -> torch.Tensor:
    """The tensor of one DCP item (``off``/``length`` in the file open as ``fd``, written by a
    ``torch.save`` of a contiguous tensor of ``sizes``/``dtype``), its bytes checked against
    ``segs`` (the item's CRC32 segments).  Read into ``dest`` when given (contiguous, of that
    shape and dtype), else into a new tensor (or ``torch.load``'s, for an item not laid out
    as expected).  Raises :class:`ItemError` on damage."""
    nbytes = math.prod(sizes) * dtype.itemsize
    out = dest if dest is not None else torch.empty(sizes, dtype=dtype)
    tensor_seg = next((s for s in segs if s[1] == nbytes), None) if nbytes >= big_min else None
    if tensor_seg is not None:  # a segment of its own: read straight into the tensor
        for seg in segs:
            s_off, s_len, s_crc = seg
            if seg is not tensor_seg and crc32(_pread_exact(fd, s_len, s_off)) != s_crc:
                raise ItemError(f"is corrupted (CRC32 mismatch in bytes {s_off}..{s_off + s_len})")
        mv = _bytes_of(out)
        _readinto_exact(fd, mv, tensor_seg[0])
        if crc32(mv) != tensor_seg[2]:
            s = tensor_seg
            raise ItemError(f"is corrupted (CRC32 mismatch in bytes {s[0]}..{s[0] + s[1]})")
        return out
    blob = _pread_exact(fd, length, off)
    mv_blob = memoryview(blob)
    for s_off, s_len, s_crc in segs:
        if crc32(mv_blob[s_off - off : s_off - off + s_len]) != s_crc:
            raise ItemError(f"is corrupted (CRC32 mismatch in bytes {s_off}..{s_off + s_len})")
    start = _data_start(blob, nbytes)
    if start is None:  # not the layout expected: torch reads the (checked) bytes
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    _bytes_of(out)[:] = mv_blob[start : start + nbytes]
    return out
