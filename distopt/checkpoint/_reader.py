"""Reading a checkpoint's tensors with every byte checked against the CRC32 segments recorded
while writing (see ``_storage.py``).

:class:`ChecksumReader` reads each item DCP asks for.  An item that holds a contiguous tensor
(the commit marker lists them) is read directly: its tensor bytes straight into the tensor they
belong to (``_direct.read_direct``), no ``torch.load``, checked on those bytes; the few small
segments around them (zip headers, pickle) with a ``pread``.  Other items (checkpoints written
before the marker listed them) go through ``torch.load`` as in plain DCP, a tensor's bytes
checked on the one read that brings them into its storage.  Every byte a rank loads is checked
and no tensor byte is read twice.  A mismatch raises :class:`CheckpointError` naming the file
and byte range.
"""

from __future__ import annotations

import bisect
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from distopt.checkpoint._common import CheckpointError, describe
from distopt.checkpoint._direct import ItemError, read_direct
from distopt.checkpoint._storage import _READ_PIECE, _SMALL, Segments, crc32


def _segments_in(segs: Segments, starts: list[int], off: int, length: int) -> Segments:
    i = bisect.bisect_left(starts, off)
    out = []
    while i < len(segs) and segs[i][0] + segs[i][1] <= off + length:
        out.append(segs[i])
        i += 1
    return out


class _CheckedView(io.RawIOBase):
    """A seekable read-only view of one item of a DCP file for ``torch.load``.  A read that is
    exactly one of the item's large segments (a tensor's bytes, read by torch straight into
    its storage) is checked on the bytes it brought: ``checked`` / ``bad`` list those."""

    def __init__(self, f: Any, off: int, length: int, big: dict[int, list[int]]) -> None:
        super().__init__()
        self._f = f
        self._off = off
        self._len = length
        self._pos = 0
        self._big = big
        self.checked: set[int] = set()
        self.bad: int | None = None
        f.seek(off)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._len}[whence]
        self._pos = max(0, base + offset)
        self._f.seek(self._off + self._pos)
        return self._pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = min(len(out), self._len - self._pos)
        if n <= 0:
            return 0
        got = self._f.readinto(out[:n])
        start = self._off + self._pos
        seg = self._big.get(start)
        if seg is not None and seg[1] == got:
            if crc32(out[:got]) != seg[2]:
                self.bad = start
            self.checked.add(start)
        self._pos += got
        return got


def _narrow(t: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != t.size(dim):
            t = t.narrow(dim, o, n)
    return t


class ChecksumReader(FileSystemReader):
    """A ``FileSystemReader`` that checks the CRC32 segments of every item it reads: a tensor's
    bytes on the read that brings them into its storage, the small segments around them with a
    ``pread``.  A mismatch (or a truncated file) raises :class:`CheckpointError` naming the file
    and bytes.

    Args:
        path: the checkpoint folder.
        segments: file name -> CRC segments (None or empty: read without checking, as DCP does).
        metadata_entry: the marker's entry for ``.metadata`` (checked when read), if any.
        row_major: file name -> offsets of the items holding a contiguous tensor, read
            directly into their targets (:func:`~distopt.checkpoint._direct.read_direct`).
        pre_error: ``(message, corrupt)``: this rank failed before the tensors; raised inside
            DCP's planning step so that every rank learns of it there.
        after: called once this rank's tensors are in place (installing state, RNG, ...);
            its failure travels through DCP's last collective to every rank.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        segments: dict[str, Segments] | None,
        *,
        metadata_entry: dict[str, Any] | None = None,
        pre_error: tuple[str, bool] | None = None,
        after: Callable[[], None] | None = None,
        row_major: dict[str, set[int]] | None = None,
    ) -> None:
        super().__init__(path)
        self._segments = segments or {}
        self._row_major = row_major or {}
        self._chunks: dict[tuple[str, tuple[int, ...]], tuple[tuple[int, ...], Any]] | None = None
        self._starts = {k: [s[0] for s in v] for k, v in self._segments.items()}
        self._metadata: Any = None
        self._metadata_entry = metadata_entry
        self.pre_error = pre_error
        self.after = after

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """DCP's ``.metadata``, read once and checked against the marker when it lists it."""
        if self._metadata is None:
            if self.pre_error is not None:  # let DCP plan nothing; the error is raised there
                from torch.distributed.checkpoint.metadata import Metadata

                return Metadata(state_dict_metadata={}, storage_data={})
            f = Path(self.path) / ".metadata"
            try:
                data = f.read_bytes()
            except OSError as exc:
                raise CheckpointError(f"cannot read {f}: {describe(exc)}", corrupt=True) from exc
            entry = self._metadata_entry
            if entry is not None and (
                len(data) != entry["size"]
                or any(crc32(data[o : o + n]) != c for o, n, c in entry["segments"])
            ):
                raise CheckpointError(
                    f"checkpoint file {f} is corrupted (CRC32 mismatch)", corrupt=True
                )
            try:
                md = pickle.loads(data)
            except Exception as exc:  # noqa: BLE001 - name the file
                raise CheckpointError(f"cannot read {f}: {describe(exc)}", corrupt=True) from exc
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            self._metadata = md
        return self._metadata

    def set_up_storage_reader(
        self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if self.pre_error is not None:  # inside DCP's planning step: every rank learns of it
            raise CheckpointError(self.pre_error[0], corrupt=self.pre_error[1])
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def read_data(self, plan: Any, planner: Any) -> Future:
        try:
            if self._segments:
                self._read_checked(plan, planner)
            else:
                super().read_data(plan, planner).wait()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch could not read what it asked for
            raise CheckpointError(f"cannot read the tensors of {self.path}: {describe(exc)}",
                                  corrupt=True) from exc  # fmt: skip
        if self.after is not None:
            try:
                self.after()
            except CheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(describe(exc, self.path),
                                      corrupt=getattr(exc, "corrupt", False)) from exc  # fmt: skip
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _bad(self, rel: str, msg: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {rel} {msg}", corrupt=True)

    def _check_rest(self, fd: int, rel: str, segs: Segments, done: set[int]) -> None:
        """Check the segments no read has checked yet (the small ones around a tensor's bytes,
        and everything of checkpoints written before large writes had segments of their own)."""
        for s_off, s_len, s_crc in segs:
            if s_off in done:
                continue
            crc, pos = 0, 0
            while pos < s_len:  # in pieces: memory stays bounded for huge segments
                data = os.pread(fd, min(_READ_PIECE, s_len - pos), s_off + pos)
                if not data:
                    raise self._bad(rel, f"is truncated: it ends at byte {s_off + pos}, an item needs bytes up to {s_off + s_len}")  # fmt: skip
                crc = crc32(data, crc)
                pos += len(data)
            if crc != s_crc:
                raise self._bad(rel, f"is corrupted (CRC32 mismatch in bytes {s_off}..{s_off + s_len})")  # fmt: skip

    def _load_item(self, f: Any, fd: int, rel: str, info: Any) -> torch.Tensor:
        segs = self._segments.get(rel)
        segs = _segments_in(segs, self._starts[rel], info.offset, info.length) if segs else []
        big = {s[0]: s for s in segs if s[1] >= _SMALL}
        view = _CheckedView(f, info.offset, info.length, big)
        try:
            t = torch.load(view, map_location="cpu", weights_only=True)
        except Exception:
            self._check_rest(fd, rel, segs, set())  # the damage that made torch fail, in words
            raise
        if view.bad is not None:
            s = big[view.bad]
            raise self._bad(rel, f"is corrupted (CRC32 mismatch in bytes {s[0]}..{s[0] + s[1]})")
        self._check_rest(fd, rel, segs, view.checked)
        return t

    def _chunk(self, index: Any) -> tuple[tuple[int, ...], Any] | None:
        """(sizes, dtype) of the saved chunk ``index`` (a ``MetadataIndex``)."""
        if self._chunks is None:
            self._chunks = {}
            for fqn, md in self.read_metadata().state_dict_metadata.items():
                for c in getattr(md, "chunks", ()):
                    self._chunks[(fqn, tuple(c.offsets))] = (tuple(c.sizes), md.properties.dtype)
        return self._chunks.get((index.fqn, tuple(index.offset or ())))

    def _item(self, f: Any, fd: int, rel: str, info: Any, req: Any, target: Any) -> torch.Tensor:
        """The tensor of one saved item: read directly when it holds a contiguous tensor (into
        ``target`` itself when the item is exactly the target), else by ``torch.load``."""
        chunk = (
            self._chunk(req.storage_index) if info.offset in self._row_major.get(rel, ()) else None
        )
        if chunk is None:
            return self._load_item(f, fd, rel, info)
        sizes, dtype = chunk
        whole = not any(req.storage_offsets) and tuple(req.lengths) == sizes
        fits = (type(target) is torch.Tensor and target.dtype == dtype and target.device.type == "cpu"
                and target.is_contiguous() and tuple(target.shape) == sizes)  # fmt: skip
        segs = _segments_in(self._segments[rel], self._starts[rel], info.offset, info.length)
        try:
            return read_direct(fd, info.offset, info.length, segs, crc32, sizes, dtype,
                               target if whole and fits else None, _SMALL)  # fmt: skip
        except ItemError as exc:
            raise self._bad(rel, str(exc)) from None

    def _read_checked(self, plan: Any, planner: Any) -> None:
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for rel, reqs in per_file.items():
            reqs.sort(key=lambda r: self.storage_data[r.storage_index].offset)
            try:
                fd = os.open(os.path.join(self.path, rel), os.O_RDONLY)
            except OSError as exc:
                raise self._bad(rel, f"cannot be read: {exc.strerror or exc}") from exc
            f = open(os.path.join(self.path, rel), "rb")  # noqa: SIM115 - closed below
            try:
                last_key, last = None, None
                for req in reqs:
                    info = self.storage_data[req.storage_index]
                    if info.transform_descriptors:
                        raise CheckpointError(f"{rel}: stream transforms are not supported")
                    key = (info.offset, info.length)
                    if req.type == LoadItemType.BYTE_IO:
                        segs = self._segments.get(rel)
                        if segs:
                            self._check_rest(
                                fd, rel, _segments_in(segs, self._starts[rel], *key), set()
                            )
                        planner.load_bytes(req, io.BytesIO(os.pread(fd, info.length, info.offset)))
                        continue
                    target = planner.resolve_tensor(req).detach()
                    if key != last_key:  # one saved chunk may feed several targets: read once
                        last = self._item(f, fd, rel, info, req, target)
                        last_key = key
                    tensor = _narrow(last, req.storage_offsets, req.lengths)
                    if tensor is target:  # read straight into it
                        planner.commit_tensor(req, target)
                        continue
                    if target.size() != tensor.size():
                        raise CheckpointError(f"{rel}: item {req.storage_index} has shape "
                                              f"{tuple(tensor.size())}, expected {tuple(target.size())}",
                                              corrupt=True)  # fmt: skip
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)
            finally:
                f.close()
                os.close(fd)


def file_segments_ok(path: Path, segs: Segments) -> str | None:
    """Full check of one file against its segments (``verify``): reads the whole file."""
    with open(path, "rb") as f:
        data = f.read()
    mv = memoryview(data)
    for off, length, c in segs:
        if crc32(mv[off : off + length]) != c:
            return f"checkpoint file {path.name} is corrupted (CRC32 mismatch in bytes {off}..{off + length})"
    return None
