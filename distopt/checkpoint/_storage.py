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
* :class:`ChecksumReader` lets ``torch.load`` read each item DCP asks for from the file, as DCP
  does: a tensor's bytes (a segment of their own, written by one large ``write``) come in one
  read straight into the tensor's storage and are checked on those bytes; the few small
  segments around them (zip headers, pickle) are checked with a ``pread``.  Every byte a rank
  loads is checked and no tensor byte is read twice.  A mismatch raises
  :class:`CheckpointError` naming the file and byte range.

CRC32 comes from ISA-L (``isal``) or zlib-ng when installed (the same CRC32, ~5x zlib's speed),
else from ``zlib``.  The files are plain DCP files: ``torch.distributed.checkpoint.load`` and
``FileSystemReader`` read them unchanged.
"""

from __future__ import annotations

import bisect
import io
import os
import pickle
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import LoadItemType
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

    def __init__(self, info: Any, file_segments: Segments | None, small: dict | None) -> None:
        self.info = info
        self.file_segments = file_segments
        self.small = small


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
        seen: set[str] = set()
        out = []
        for wr in results:
            name = wr.storage_data.relative_path
            segs = None
            if name not in seen:
                seen.add(name)
                segs = self.segments.get(name, [])
            out.append(
                WriteResult(wr.index, wr.size_in_bytes, _Riding(wr.storage_data, segs, small))
            )
            small = None
        if small is not None:  # nothing of DCP's to ride on: rank 0 reads these files instead
            out = []
        fut: Future = Future()
        fut.set_result(out)
        return fut

    def finish(self, metadata: Any, results: list[list[WriteResult]]) -> None:
        files: dict[str, Any] = {}
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
                    r = r.info
                mine.append(WriteResult(wr.index, wr.size_in_bytes, r))
            plain.append(mine)
        try:
            super().finish(metadata, plain)
        except Exception as exc:
            raise self._error(exc) from exc
        segs = self.segments.pop(".metadata.tmp", None)
        if segs is not None:
            files[".metadata"] = {"size": sum(s[1] for s in segs), "segments": segs}
        if self._commit is not None:
            self._commit(files)


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
    ) -> None:
        super().__init__(path)
        self._segments = segments or {}
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
                    if key != last_key:  # one saved chunk may feed several targets: read once
                        last = self._load_item(f, fd, rel, info)
                        last_key = key
                    tensor = _narrow(last, req.storage_offsets, req.lengths)
                    target = planner.resolve_tensor(req).detach()
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


def whole(data: bytes) -> Segments:
    return file_entry(data)["segments"]
