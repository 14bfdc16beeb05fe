"""Asynchronous saves: the snapshot of the state and the one save in flight.

An asynchronous save (``save(..., async_=True)``) returns at once.  A background thread copies
the state into reusable CPU buffers (pinned memory for GPU tensors; GPU copies are enqueued on
the tensors' stream before ``save`` returns) and then writes it like a synchronous save.  While
the copy runs, every optimizer's ``step`` waits for it (a global ``torch.optim`` step
pre-hook), so the checkpoint holds the state of the moment ``save`` was called; code writing
parameters or state outside ``step`` calls :func:`wait_snapshot`.  At most one save is in
flight; :func:`wait` joins it and raises its failure.
"""

from __future__ import annotations

import logging
import threading
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distopt.checkpoint._common import CheckpointError, dist_on
from distopt.checkpoint._common import rank as _rank
from distopt.checkpoint._common import world as _world

log = logging.getLogger("distopt.checkpoint")

Spec = tuple


# Snapshot buffers of asynchronous saves, kept from one save to the next (as DCP's stager does
# with cache_staged_state_dict): copying into memory already touched costs a fraction of
# allocating it anew.  Safe because a save waits for the previous one before it copies.
_STAGING: dict[str, Tensor] = {}


def release_staging() -> None:
    """Free the snapshot buffers kept by asynchronous saves (after waiting for the one in flight)."""
    wait()
    _STAGING.clear()


def stage(
    specs: dict[str, Spec], deferred: list[Any] | None = None, now: tuple[str, ...] = ()
) -> dict[str, Spec]:
    """A snapshot of the tensors for an asynchronous save: plain copies on CPU (pinned host
    memory for GPU tensors), in buffers reused from the previous asynchronous save when the
    shapes agree.  Only the raw rows are copied; building DCP's sharded views of them
    (``_materialize``) is left to the background thread.

    Without ``deferred`` every copy is done here (GPU copies: one device sync).  With it, GPU
    copies are only enqueued (non-blocking, on the tensors' current stream, so that later
    kernels on that stream run after them) and an event per device is appended; CPU copies are
    appended as ``(buffer, source)`` pairs: :func:`run_deferred` does them in the background,
    except those of keys starting with one of ``now``, copied here."""
    cuda: dict[Any, None] = {}
    rank, world = _rank(), _world()
    for k in set(_STAGING) - set(specs):
        del _STAGING[k]

    def snap(t: Tensor, key: str) -> Tensor:
        buf = _STAGING.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            _STAGING[key] = buf
        if t.is_cuda:
            cuda[t.device] = None
            buf.copy_(t, non_blocking=True)
        elif deferred is not None and not key.startswith(now):
            deferred.append((buf, t))
        else:
            buf.copy_(t)
        return buf

    out: dict[str, Spec] = {}
    load = [0] * world  # bytes of complete parameters each rank writes (same on every rank)
    for key, spec in specs.items():
        if spec[0] == "rows":
            out[key] = ("rows", snap(spec[1], key), *spec[2:])
        elif spec[0] == "dtensor":
            _, t, bounds, r, group = spec
            local = snap(t.to_local(), key)
            # sharded: the same rows as a sharded tensor; replicated: the local copy is complete
            out[key] = (
                ("plain", local)
                if bounds is None
                else ("rows", local, tuple(t.shape), bounds, r, group)
            )
        elif world > 1 and spec[1].dim() >= 1:
            # complete on every rank: one rank copies and writes it whole (DCP would write one
            # rank's copy anyway), the ranks taking turns, so the snapshot costs about
            # 1/world of these tensors per rank and the checkpoint holds one item per tensor,
            # as a synchronous save's (a load reads it in one piece, not world pieces)
            t = spec[1]
            if key.startswith("model/"):  # every rank lists every parameter, in one order
                owner = min(range(world), key=lambda r: (load[r], r))
                load[owner] += t.numel() * t.element_size()
            else:  # state a rank may lack (no rows of that parameter): from the name alone
                owner = zlib.crc32(key.encode()) % world
            bounds = [(0, t.shape[0]) if r == owner else (0, 0) for r in range(world)]
            local = snap(t, key) if rank == owner else t[:0]
            out[key] = ("rows", local, tuple(t.shape), bounds, rank, None)
        else:
            out[key] = ("plain", snap(spec[1], key))
    for device in cuda:
        if deferred is None:
            torch.cuda.synchronize(device)
        else:
            deferred.append((None, torch.cuda.current_stream(device).record_event()))
    return out


def run_deferred(deferred: list[Any]) -> None:
    """The copies :func:`stage` left for the background: CPU copies, then GPU copies' events."""
    for buf, src in deferred:
        if buf is None:
            src.synchronize()
        else:
            buf.copy_(src)


class _Pending:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None
        self.thread: threading.Thread | None = None
        self.staged = threading.Event()  # the snapshot is complete


_PENDING: _Pending | None = None
_ASYNC_GROUP: Any = None
_ATEXIT = False
_STEP_GUARD: Any = None


def wait_snapshot() -> None:
    """Wait until the asynchronous save in flight (if any) has taken its snapshot.

    An asynchronous save copies the state in a background thread.  Every optimizer's ``step``
    waits for that copy before it runs (a global step pre-hook), so training needs nothing
    else; code that writes parameters or optimizer state in place *outside* ``step`` right after
    an asynchronous save (``p.data.copy_``, ``model.load_state_dict``, ``optimizer.
    load_state_dict``, ``Lookahead.sync_lookahead`` called by hand) calls this first.  Cheap
    when nothing is in flight; never raises (a failure is raised by :func:`wait`)."""
    p = _PENDING
    if p is not None and not p.staged.is_set():
        p.staged.wait()


def _step_pre_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    wait_snapshot()


def install_step_guard() -> None:
    """Once per process: every optimizer's ``step`` waits for a snapshot being taken."""
    global _STEP_GUARD
    if _STEP_GUARD is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _STEP_GUARD = register_optimizer_step_pre_hook(_step_pre_hook)


def copies_in_background(optimizer: Any) -> bool:
    """May the snapshot be copied after ``save`` returns?  Only when every later write to the
    saved tensors goes through an optimizer's ``step`` (which waits for it): there is an
    optimizer, and none in its wrapper chain changes parameters outside ``step`` by design
    (a schedule-free optimizer's ``train``/``eval``: those say so with
    ``check_checkpointable``).  A mid-window accumulator's gradient sum (backward adds into
    it) is always copied before ``save`` returns."""
    if optimizer is None:
        return False
    inner = optimizer
    while inner is not None:
        if not isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "optimizer"):
            return False
        if callable(getattr(inner, "check_checkpointable", None)):
            return False
        inner = getattr(inner, "optimizer", None) or getattr(inner, "base_optimizer", None)
    return True


def wait() -> Path | None:
    """Wait for the asynchronous save in flight, if any; returns its folder (None: none was in
    flight).  Raises :class:`CheckpointError` on every rank if it failed on any rank."""
    global _PENDING
    p = _PENDING
    if p is None:
        return None
    if p.thread is not None:
        p.thread.join()
    _PENDING = None
    if p.error:
        raise CheckpointError(p.error)
    return p.path


def _wait_at_exit() -> None:
    try:
        wait()
    except CheckpointError as exc:
        log.error("the last asynchronous checkpoint save failed: %s", exc)


def async_group() -> Any:
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None and dist_on():
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


def start(pending: _Pending) -> None:
    """Make ``pending`` the save in flight (its thread is started by the caller)."""
    global _PENDING, _ATEXIT
    _PENDING = pending
    if not _ATEXIT:
        import atexit

        atexit.register(_wait_at_exit)
        _ATEXIT = True
