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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from distopt.checkpoint._common import CheckpointError

_OVERLAP_MIN = 1 << 20  # buffers from this size on: CRC in a helper thread beside the write
_SMALL = 1 << 16  # writes below this size are gathered first
_READ_PIECE = 1 << 26  # the load-time check reads at most this much at a time

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
        self._small = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = len(b) if isinstance(b, (bytes, bytearray)) else memoryview(b).nbytes
        if n < _SMALL:  # torch.save writes many small pieces: gather them (one CRC, one write)
            self._small += b
            self._pos += n
            self._len += n
            if len(self._small) >= _OVERLAP_MIN:
                self._drain()
            return n
        self._drain()
        mv = memoryview(b).cast("B")
        if n >= _OVERLAP_MIN:
            fut = self._pool.submit(zlib.crc32, mv, self._crc)
            self._raw_write(mv)
            self._crc = fut.result()
        else:
            self._crc = zlib.crc32(mv, self._crc)
            self._raw_write(mv)
        self._pos += n
        self._len += n
        return n

    def _raw_write(self, data: Any) -> None:
        try:
            self._raw.write(data)
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, self._path) from exc
            raise

    def _drain(self) -> None:
        if self._small:
            self._crc = zlib.crc32(self._small, self._crc)
            self._raw_write(self._small)
            self._small = bytearray()

    def _cut(self) -> None:
        self._drain()
        if self._len:
            self._segments.append([self._start, self._len, self._crc])
        self._start, self._len, self._crc = self._pos, 0, 0

    def tell(self) -> int:  # DCP asks at each item's start and end: segment boundaries
        self._cut()
        return self._pos

    def fileno(self) -> int:
        self.flush()
        return self._raw.fileno()

    def flush(self) -> None:
        self._drain()
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


class ChecksumReader(FileSystemReader):
    """A ``FileSystemReader`` that checks the CRC32 segments of every item it reads.

    DCP's own read path is left as it is; a helper thread reads the same byte ranges (from the
    page cache, with ``pread``) and checks their CRC32 meanwhile — both release the GIL, so on a
    machine with a spare core the check costs no wall time.  A mismatch (or a truncated file)
    raises :class:`CheckpointError` naming the file and bytes, also when it made DCP's read fail.
    """

    def __init__(self, path: str | os.PathLike, segments: dict[str, Segments] | None) -> None:
        super().__init__(path)
        self._segments = segments or {}
        self._starts = {k: [s[0] for s in v] for k, v in self._segments.items()}
        self._metadata: Any = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """DCP's ``.metadata``, read once (distopt looks at it before DCP's own load does)."""
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata

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

    def _verify(self, jobs: list[tuple[str, int, int]], result: dict[str, str]) -> None:
        fds: dict[str, int] = {}
        try:
            for rel, off, length in jobs:
                if rel not in fds:
                    fds[rel] = os.open(os.path.join(self.path, rel), os.O_RDONLY)
                for s_off, s_len, s_crc in self._segments_in(rel, off, length):
                    crc, pos = 0, 0
                    while pos < s_len:  # in pieces: memory stays bounded for huge tensors
                        data = os.pread(fds[rel], min(_READ_PIECE, s_len - pos), s_off + pos)
                        if not data:
                            result["bad"] = (f"checkpoint file {rel} is truncated: it ends at byte "
                                             f"{s_off + pos}, an item needs bytes up to {off + length}")  # fmt: skip
                            return
                        crc = zlib.crc32(data, crc)
                        pos += len(data)
                    if crc != s_crc:
                        result["bad"] = (f"checkpoint file {rel} is corrupted (CRC32 mismatch in bytes "
                                         f"{s_off}..{s_off + s_len})")  # fmt: skip
                        return
        except OSError as exc:
            result["bad"] = (
                f"cannot read checkpoint file {exc.filename or ''}: {exc.strerror or exc}"
            )
        finally:
            for fd in fds.values():
                os.close(fd)

    def read_data(self, plan: Any, planner: Any) -> torch.futures.Future:
        jobs = sorted({
            (info.relative_path, info.offset, info.length)
            for info in (self.storage_data[req.storage_index] for req in plan.items)
            if info.relative_path in self._segments
        })  # fmt: skip
        result: dict[str, str] = {}
        checker = threading.Thread(
            target=self._verify, args=(jobs, result), name="distopt-crc", daemon=True
        )
        checker.start()
        try:
            fut = super().read_data(plan, planner)
        except BaseException as exc:
            checker.join()
            if "bad" in result:  # the damage that made torch fail, in words
                raise CheckpointError(result["bad"], corrupt=True) from exc
            raise
        checker.join()
        if "bad" in result:
            raise CheckpointError(result["bad"], corrupt=True)
        return fut


def file_segments_ok(path: Path, segs: Segments) -> str | None:
    """Full check of one file against its segments (``verify``): reads the whole file."""
    with open(path, "rb") as f:
        data = f.read()
    return _check(memoryview(data), 0, segs, path.name)


def whole(data: bytes) -> Segments:
    return [[0, len(data), zlib.crc32(data)]] if data else []
