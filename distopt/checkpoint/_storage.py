"""DCP storage with the integrity check and the cross-rank agreement folded into DCP itself.

Plain DCP writes each rank's tensors into ``__<rank>_<n>.distcp`` files and reads them back by
byte ranges.  distopt adds CRC32 integrity and a commit protocol without a second pass over the
files and without collectives of its own:

* :class:`ChecksumWriter` computes CRC32 over the bytes as DCP hands them to the file (for large
  buffers in a helper thread, in parallel with the ``write`` system call; both release the
  GIL), one *segment* per stretch of the file between DCP's item boundaries:
  ``(offset, length, crc32)``.  The segments ride to rank 0 inside DCP's own gathered write
  results; rank 0's ``finish`` (which DCP runs once every rank's write succeeded, and whose
  outcome DCP broadcasts) writes ``.metadata``, then distopt's commit (marker, rename).  A
  failure on any rank, in any phase, raises on every rank through DCP's own collectives.
* A tensor's bytes (one large ``write`` of ``torch.save``) are a segment of their own, and the
  planner (``_direct.SavePlanner``) tells which items hold a contiguous tensor: the marker
  lists them, and the load (``_reader.ChecksumReader``) reads their bytes straight into the
  tensors they belong to, checked on those bytes.

CRC32 comes from ISA-L (``isal``) or zlib-ng when installed (the same CRC32, ~5x zlib's speed),
else from ``zlib``.  The files are plain DCP files: ``torch.distributed.checkpoint.load`` and
``FileSystemReader`` read them unchanged.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from distopt.checkpoint._common import CheckpointError, describe, fsync_dir

try:  # the same CRC32 as zlib's, several times faster
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from zlib_ng.zlib_ng import crc32
    except ImportError:
        from zlib import crc32

CRC_IMPL = crc32.__module__ or "zlib"
# zlib's CRC32 (1-2 GB/s) runs in a helper thread beside the write of a large buffer; the
# accelerated ones (several GB/s) run inline: handing a buffer to a thread and the GIL back
# costs more than they take
_OVERLAP = CRC_IMPL == "zlib"

_OVERLAP_MIN = 1 << 20  # zlib: buffers from this size on, CRC in a helper thread beside the write
_SMALL = 1 << 16  # writes below this size are gathered first
_READ_PIECE = 1 << 26  # a segment checked with pread is read in pieces of this size

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
        # a large write (a tensor's bytes) is a segment of its own: the load checks it on the
        # one read that brings it into the tensor's storage
        self._cut()
        mv = memoryview(b).cast("B")
        if n >= _OVERLAP_MIN and _OVERLAP:
            fut = self._pool.submit(crc32, mv)
            self._raw_write(mv)
            crc = fut.result()
        else:
            crc = crc32(mv)
            self._raw_write(mv)
        self._segments.append([self._pos, n, crc])
        self._pos += n
        self._start = self._pos
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
            self._crc = crc32(self._small, self._crc)
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
        if mode != "wb":
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


class _Riding:
    """A write result's storage info, with its file's CRC segments riding along (once per
    file) and this rank's small files (once per rank) — unwrapped again on rank 0."""

    def __init__(
        self, info: Any, file_segments: Segments | None, small: dict | None, row_major: bool
    ) -> None:
        self.info = info
        self.file_segments = file_segments
        self.small = small
        self.row_major = row_major  # a contiguous tensor's item: its bytes can be read directly


def file_entry(data: bytes) -> dict[str, Any]:
    """The marker's entry for a file written in one piece: its size and one CRC32 segment."""
    return {"size": len(data), "segments": [[0, len(data), crc32(data)]] if data else []}


class ChecksumWriter(FileSystemWriter):
    """A ``FileSystemWriter`` that records CRC32 segments of every file it writes (nothing is
    read back) and folds distopt's phases into DCP's collectives.

    Args:
        path: the folder (``<checkpoint>.partial``).
        prepare_error: this rank's error from before the write, in words: raised inside DCP's
            planning step, so that every rank learns of it there.
        small: ``(name, bytes)`` files this rank writes beside DCP's (RNG streams, metadata):
            written and synced in a helper thread while DCP writes the tensors (``bytes`` may
            be a callable making them there).
        commit: rank 0's commit, ``commit(files)`` with every file's marker entry; runs inside
            DCP's ``finish`` after ``.metadata`` is written, so that its failure is raised on
            every rank by DCP's own broadcast.
        needs, free0: the checkpoint's tensor bytes and the free space when the save started,
            for "no space left on device" messages.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        prepare_error: str | None = None,
        small: list[tuple[str, Any]] | None = None,
        commit: Callable[[dict[str, Any]], None] | None = None,
        needs: int | None = None,
        free0: int | None = None,
    ) -> None:
        super().__init__(path)
        self.segments: dict[str, Segments] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distopt-crc")
        self.fs = _ChecksumFS(self.segments, self._pool)
        self._prepare_error = prepare_error
        self._small = small or []
        self._commit = commit
        self._needs = needs
        self._free0 = free0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _error(self, exc: BaseException, what: str = "") -> CheckpointError:
        if isinstance(exc, CheckpointError):
            return exc
        return CheckpointError(what + describe(exc, self.path, self._needs, self._free0))

    def prepare_local_plan(self, plan: Any) -> Any:
        if self._prepare_error is not None:
            raise CheckpointError(self._prepare_error)
        try:
            return super().prepare_local_plan(plan)
        except OSError as exc:
            raise self._error(exc) from exc

    def _write_small(self, errors: list[BaseException]) -> None:
        # every file written first, then each synced: the first sync commits the file system's
        # journal for all of them, so the others cost little more (one sync after each write
        # would commit it once per file)
        p = Path(self.path)
        files: list[tuple[Path, Any]] = []
        try:
            dirs = set()
            for i, (name, data) in enumerate(self._small):
                p = Path(self.path) / name
                if callable(data):  # made here, off the caller's path
                    data = data()
                    self._small[i] = (name, data)
                f = open(p, "wb")  # noqa: SIM115 - closed below
                files.append((p, f))
                f.write(data)
                f.flush()
                dirs.add(p.parent)
            for q, f in files:
                p = q  # named in the error
                os.fsync(f.fileno())
            # sub-folders (rng/) synced here, off the commit's path; the folder itself is synced
            # by the commit, after the marker
            for d in dirs - {Path(self.path)}:
                fsync_dir(d)
        except OSError as exc:
            if exc.filename is None:
                exc = OSError(exc.errno, exc.strerror, str(p))
            errors.append(exc)
        except Exception as exc:  # noqa: BLE001 - making a file's bytes failed: raised in write_data
            errors.append(exc)
        finally:
            for p, f in files:
                try:
                    f.close()
                except OSError as exc:  # a full disk may show only here
                    if not errors:
                        errors.append(OSError(exc.errno, exc.strerror, str(p)))

    def write_data(self, plan: Any, planner: Any) -> Future:
        errors: list[BaseException] = []
        helper = threading.Thread(target=self._write_small, args=(errors,), name="distopt-small")
        helper.start()  # the small files go to the disk while DCP writes the tensors
        try:
            results = super().write_data(plan, planner).value()
        except Exception as exc:
            helper.join()
            raise self._error(exc) from exc
        helper.join()
        if errors:
            raise self._error(errors[0]) from errors[0]
        small = {name: file_entry(data) for name, data in self._small}
        row_major = getattr(planner, "row_major", {})
        seen: set[str] = set()
        out = []
        for wr in results:
            name = wr.storage_data.relative_path
            segs = None
            if name not in seen:
                seen.add(name)
                segs = self.segments.get(name, [])
            riding = _Riding(wr.storage_data, segs, small, row_major.get(wr.index, False))
            out.append(WriteResult(wr.index, wr.size_in_bytes, riding))
            small = None
        if small is not None:  # nothing of DCP's to ride on: rank 0 reads these files instead
            out = []
        fut: Future = Future()
        fut.set_result(out)
        return fut

    def finish(self, metadata: Any, results: list[list[WriteResult]]) -> None:
        files: dict[str, Any] = {}
        direct: dict[str, list[int]] = {}
        plain = []
        for wr_list in results:
            mine = []
            for wr in wr_list:
                r = wr.storage_data
                if isinstance(r, _Riding):
                    if r.file_segments is not None:
                        size = sum(s[1] for s in r.file_segments)
                        files[r.info.relative_path] = {"size": size, "segments": r.file_segments}
                    if r.small:
                        files.update(r.small)
                    if r.row_major:
                        direct.setdefault(r.info.relative_path, []).append(r.info.offset)
                    r = r.info
                mine.append(WriteResult(wr.index, wr.size_in_bytes, r))
            plain.append(mine)
        for name, offsets in direct.items():  # the items a load may read directly (_direct.py)
            if name in files:
                files[name]["rowmajor"] = sorted(offsets)
        try:
            super().finish(metadata, plain)
        except Exception as exc:
            raise self._error(exc) from exc
        segs = self.segments.pop(".metadata.tmp", None)
        if segs is not None:
            files[".metadata"] = {"size": sum(s[1] for s in segs), "segments": segs}
        if self._commit is not None:
            self._commit(files)


def whole(data: bytes) -> Segments:
    return file_entry(data)["segments"]
