"""DCP storage with the integrity check folded into the write and the read.

Plain DCP writes each rank's tensors into ``__<rank>_<n>.distcp`` files and reads them back by
byte ranges.  distopt used to check the files with a separate CRC32 pass after the save (reading
every byte back) and another one before each load; these two classes remove both passes:

* :class:`ChecksumWriter` computes CRC32 over the bytes as DCP hands them to the file, while the
  same bytes are being written (for large buffers the CRC runs in a helper thread in parallel
  with the ``write`` system call; both release the GIL).  It records one *segment* per stretch
  of the file between DCP's item boundaries: ``(offset, length, crc32)``.  Segments cover every
  byte of the file, and never straddle two items.
* :class:`ChecksumReader` reads each item DCP asks for into memory in one piece, checks the CRC32
  of every segment inside it (in a helper thread, overlapped with deserialising and copying the
  previous item), and raises :class:`CheckpointError` naming the file and byte range on a
  mismatch.  A resharded load reads whole items too, so every byte a rank loads is checked.

The files themselves are plain DCP files: ``torch.distributed.checkpoint.load`` and
``FileSystemReader`` read them unchanged.
"""

from __future__ import annotations

import bisect
import io
import os
import threading
import zlib
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import LoadItemType

from distopt.checkpoint._common import CheckpointError

_OVERLAP_MIN = 1 << 20  # buffers from this size on: CRC in a helper thread beside the write

Segments = list[list[int]]  # [[offset, length, crc32], ...], ascending offsets


class _ChecksumStream(io.RawIOBase):
    """Write-only stream that checksums what passes through, one segment per item."""

    def __init__(
        self,
        raw: Any,
        path: str,
        sink: dict[str, Segments],
        pool: ThreadPoolExecutor,
        lock: threading.Lock,
    ):
        super().__init__()
        self._raw = raw
        self._path = path
        self._sink = sink
        self._pool = pool
        self._lock = lock
        self._pos = 0
        self._start = 0
        self._len = 0
        self._crc = 0
        self._segments: Segments = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = mv.nbytes
        try:
            if n >= _OVERLAP_MIN:
                fut = self._pool.submit(zlib.crc32, mv, self._crc)
                self._raw.write(mv)
                self._crc = fut.result()
            else:
                self._crc = zlib.crc32(mv, self._crc)
                self._raw.write(mv)
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, self._path) from exc
            raise
        self._pos += n
        self._len += n
        return n

    def _cut(self) -> None:
        if self._len:
            self._segments.append([self._start, self._len, self._crc])
        self._start, self._len, self._crc = self._pos, 0, 0

    def tell(self) -> int:  # DCP asks at each item's start and end: segment boundaries
        self._cut()
        return self._pos

    def fileno(self) -> int:
        return self._raw.fileno()

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        if not self.closed:
            self._cut()
            with self._lock:
                self._sink[self._path] = self._segments
        super().close()


class _ChecksumFS(FileSystem):
    def __init__(self, sink: dict[str, Segments], pool: ThreadPoolExecutor) -> None:
        super().__init__()
        self._sink = sink
        self._pool = pool
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        path = Path(path)
        if mode != "wb" or path.name.startswith(".metadata"):
            with super().create_stream(path, mode) as s:
                yield s
            return
        try:
            with path.open(mode) as raw:
                stream = _ChecksumStream(raw, path.name, self._sink, self._pool, self._lock)
                yield stream  # type: ignore[misc]
                stream.close()
        except OSError as exc:  # a full disk often shows at flush/close: name the file
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise


class ChecksumWriter(FileSystemWriter):
    """A ``FileSystemWriter`` that records CRC32 segments of every data file it writes
    (``self.segments``: file name -> segments) without reading anything back."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.segments: dict[str, Segments] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distopt-crc")
        self.fs = _ChecksumFS(self.segments, self._pool)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _check(mv: memoryview, base: int, segs: Segments, name: str) -> str | None:
    for off, length, crc in segs:
        if zlib.crc32(mv[off - base : off - base + length]) != crc:
            return f"checkpoint file {name} is corrupted (CRC32 mismatch in bytes {off}..{off + length})"
    return None


def _raise_first_bad(checks: list[Future]) -> None:
    for c in checks:
        bad = c.result()
        if bad:
            raise CheckpointError(bad, corrupt=True)


class ChecksumReader(FileSystemReader):
    """A ``FileSystemReader`` that checks the CRC32 segments of every item it reads."""

    def __init__(self, path: str | os.PathLike, segments: dict[str, Segments] | None) -> None:
        super().__init__(path)
        self._segments = segments or {}
        self._starts = {k: [s[0] for s in v] for k, v in self._segments.items()}

    def _segments_in(self, name: str, off: int, length: int) -> Segments:
        segs = self._segments.get(name)
        if not segs:
            return []
        starts = self._starts[name]
        i = bisect.bisect_left(starts, off)
        out = []
        while i < len(segs) and segs[i][0] + segs[i][1] <= off + length:
            out.append(segs[i])
            i += 1
        return out

    def read_data(self, plan: Any, planner: Any) -> torch.futures.Future:
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        pool = ThreadPoolExecutor(1, thread_name_prefix="distopt-crc")
        checks: list[Future] = []
        try:
            for rel, reqs in per_file.items():
                with open(os.path.join(self.path, rel), "rb") as f:
                    for req in sorted(
                        reqs, key=lambda r: self.storage_data[r.storage_index].offset
                    ):
                        info = self.storage_data[req.storage_index]
                        if getattr(info, "transform_descriptors", None):
                            raise CheckpointError(
                                f"{rel}: stream transforms are not supported by distopt's reader"
                            )
                        f.seek(info.offset)
                        buf = f.read(info.length)
                        if len(buf) != info.length:
                            raise CheckpointError(
                                f"checkpoint file {rel} is truncated: item at byte {info.offset} needs "
                                f"{info.length} bytes, {len(buf)} there",
                                corrupt=True,
                            )
                        segs = self._segments_in(rel, info.offset, info.length)
                        if segs:
                            checks.append(
                                pool.submit(_check, memoryview(buf), info.offset, segs, rel)
                            )
                        if req.type == LoadItemType.BYTE_IO:
                            planner.load_bytes(req, io.BytesIO(buf))
                            continue
                        try:
                            tensor = torch.load(
                                io.BytesIO(buf), map_location="cpu", weights_only=True
                            )
                        except Exception as exc:  # noqa: BLE001 - a damaged item: say which
                            _raise_first_bad(checks)
                            raise CheckpointError(
                                f"checkpoint file {rel} is corrupted: item at byte {info.offset} "
                                f"does not deserialise ({type(exc).__name__})",
                                corrupt=True,
                            ) from exc
                        for dim, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                            tensor = tensor.narrow(dim, o, n)
                        target = planner.resolve_tensor(req).detach()
                        if target.size() != tensor.size():
                            raise CheckpointError(
                                f"{rel}: item {req.storage_index.fqn} has shape {tuple(tensor.size())}, "
                                f"expected {tuple(target.size())}",
                                corrupt=True,
                            )
                        target.copy_(tensor)
                        planner.commit_tensor(req, target)
            _raise_first_bad(checks)
        finally:
            pool.shutdown(wait=True)
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(None)
        return fut


def file_segments_ok(path: Path, segs: Segments) -> str | None:
    """Full check of one file against its segments (``verify``): reads the whole file."""
    with open(path, "rb") as f:
        data = f.read()
    return _check(memoryview(data), 0, segs, path.name)


def whole(data: bytes) -> Segments:
    return [[0, len(data), zlib.crc32(data)]] if data else []
