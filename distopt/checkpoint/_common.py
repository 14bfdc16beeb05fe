"""Shared pieces of the checkpoint package: the one exception type, the message of a failure
that DCP's collectives brought to every rank, error descriptions in words, and small file
helpers."""

from __future__ import annotations

import errno
import gc
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read, is incomplete or corrupted, or does not fit the
    model/optimizer.  Raised on every rank alike (never only on the rank that saw the problem).

    Attributes:
        corrupt: True when the checkpoint itself is damaged (missing, truncated or changed files,
            an unreadable marker or metadata file): ``CheckpointManager.load_latest`` then steps
            back to an older checkpoint.  False for a checkpoint that is fine but does not fit.
    """

    def __init__(self, message: str, *, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt

    def __reduce__(self) -> tuple:  # travels inside DCP's collectives with ``corrupt`` kept
        return (_rebuild_error, (str(self), self.corrupt))


def _rebuild_error(message: str, corrupt: bool) -> CheckpointError:
    return CheckpointError(message, corrupt=corrupt)


def failure_message(exc: BaseException) -> tuple[str, bool]:
    """(message, corrupt) for an exception out of a DCP ``save``/``load``.

    Inside DCP, distopt's storage classes raise :class:`CheckpointError` with the cause already
    in words (on the rank that saw it); DCP's collectives bring every rank's failure to every
    rank as one ``CheckpointException``, so the message built here is the same on every rank and
    no extra agreement is needed.  Failures that are not a ``CheckpointError`` (torch's own
    planning or reading) count as damage (``corrupt``)."""
    from torch.distributed.checkpoint import CheckpointException

    if not isinstance(exc, CheckpointException):
        if isinstance(exc, CheckpointError):
            return str(exc), exc.corrupt
        return describe(exc), True
    by_text: dict[str, list[int]] = {}
    corrupt = False
    for r, (inner, _trace) in sorted(exc.failures.items()):
        if isinstance(inner, CheckpointError):
            text, bad = str(inner), inner.corrupt
        else:
            text, bad = describe(inner), True
        corrupt = corrupt or bad
        by_text.setdefault(text, []).append(r)
    if not by_text:
        return str(exc).splitlines()[0], True
    multi = world() > 1
    lines = []
    for text, ranks in by_text.items():
        if multi:
            who = "rank " + ", ".join(map(str, ranks))  # "rank 0, 1: ..." when alike
            text = f"{who}: {text}"
        lines.append(text)
    return (lines[0] if len(lines) == 1 else "\n  " + "\n  ".join(lines)), corrupt


# --------------------------------------------------------------------------- distributed helpers


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world() -> int:
    return dist.get_world_size() if dist_on() else 1


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for a synchronous save or load.

    Their many short-lived objects (plans, pickles, DCP's per-item bookkeeping) count towards
    the collector's thresholds and trigger collections; a full one walks the process's whole
    heap (~0.15 s for the 300k objects of a process that imported torch, more in a real
    training job) while the other ranks wait in DCP's next collective.  Those objects are
    freed by reference counting anyway; any cycles left are collected after, as usual."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# --------------------------------------------------------------------------- errors in words


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def free_bytes(path: str | os.PathLike) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def describe(
    exc: BaseException,
    where: str | os.PathLike | None = None,
    needs: int | None = None,
    free_at_start: int | None = None,
) -> str:
    """One exception in words: which file, what went wrong (a full disk: the free space now and
    when the save started, and the size of the checkpoint's tensors)."""
    from torch.distributed.checkpoint import CheckpointException

    if isinstance(exc, CheckpointException):
        parts = []
        for r, (inner, _trace) in sorted(exc.failures.items()):
            mine = free_at_start if r == rank() else None  # each rank knows its own disk
            parts.append(f"rank {r}: {describe(inner, where, needs, mine)}")
        return "; ".join(parts) or str(exc).splitlines()[0]
    if isinstance(exc, CheckpointError):
        return str(exc)
    if isinstance(exc, OSError):
        fname = exc.filename or where
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            what = {
                errno.ENOSPC: "no space left on device",
                errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for this file system or limit",
            }[exc.errno]
            free = free_bytes(fname or ".")
            msg = f"{what} writing {fname}"
            if free is not None:
                msg += f": {fmt_bytes(free)} free"
            if free_at_start is not None:
                msg += f" ({fmt_bytes(free_at_start)} when the save started)"
            if needs:
                msg += f"; the checkpoint's tensors alone are ~{fmt_bytes(needs)}"
            return msg
        return f"{exc.strerror or exc} ({fname})" if fname else f"{type(exc).__name__}: {exc}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    loc = f" ({where})" if where else ""
    return f"{type(exc).__name__}: {text}{loc}"


# --------------------------------------------------------------------------- files


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a ``.tmp`` file and a rename; the ``.tmp`` file is
    removed again when the write fails (a full disk keeps nothing half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(tmp)) from exc
        raise
    os.replace(tmp, path)
