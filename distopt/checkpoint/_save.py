"""``save``: collective, atomic, optionally asynchronous; every phase agreed across ranks.

Phases, each ending in one small all-gather of "ok / what went wrong" (see ``agree``)::

    prepare   rank 0 creates <path>.partial
    collect   every rank takes its view of the state (accumulator mid-window: a collective)
    [async: the state is copied (pinned memory for GPU tensors); the rest runs in a thread,
     with its collectives on a dedicated gloo group, while training continues]
    tensors   DCP writes every rank's rows; CRC32 computed on the fly (``ChecksumWriter``)
    rng       every rank writes rng/rank-<r>.pt
    meta      rank 0 writes distopt_meta.pt
    marker    sizes and CRC segments gathered; rank 0 writes COMMITTED
    commit    rank 0 renames <path>.partial to <path> (and the manager moves ``latest``)

A failure in any phase on any rank raises the same :class:`CheckpointError` on every rank (rank,
file, cause in words), and the ``.partial`` folder is removed.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt._dtensor import is_dtensor
from distopt._version import __version__
from distopt.checkpoint import _save_load as fmt
from distopt.checkpoint._common import (
    CheckpointError,
    agree,
    describe,
    dist_on,
    free_bytes,
    fsync_dir,
    gather_objects,
    raise_gathered,
    write_atomic_bytes,
)
from distopt.checkpoint._common import (
    rank as _rank,
)
from distopt.checkpoint._common import (
    world as _world,
)
from distopt.checkpoint._layout import (
    Entry,
    _chunk_bounds,
    detect_mode,
    entries,
    local_of,
    state_is_row_sharded,
)
from distopt.checkpoint._storage import ChecksumWriter, whole

log = logging.getLogger("distopt.checkpoint")

# A tensor to save: ("plain", t) complete on every rank; ("rows", local, global shape, bounds,
# rank, group) split by dim-0 rows over a process group (None: the world); ("dtensor", t,
# bounds, rank, group) a DTensor DCP saves as it is.
Spec = tuple


def _collect(model: nn.Module, optimizer: Any) -> tuple[dict[str, Spec], dict, dict, list[Entry]]:
    # an optimizer may refuse to be saved now (a schedule-free one in eval mode: the
    # parameters hold its averaged weights, not the iterate training resumes from)
    inner = optimizer
    while inner is not None:
        check = getattr(inner, "check_checkpointable", None)
        if callable(check):
            check()
        inner = getattr(inner, "optimizer", None) or getattr(inner, "base_optimizer", None)
    ents = entries(model, optimizer)
    specs: dict[str, Spec] = {}
    state_meta: dict[str, dict[str, dict[str, Any]]] = {}
    objects: dict[str, dict[str, Any]] = {}
    for e in ents:
        p = e.param
        if is_dtensor(p):  # DCP saves it as it is; an async snapshot takes its local rows
            specs[f"model/{e.fqn}"] = ("dtensor", p.detach(), e.bounds, e.rank, e.group)
        else:
            specs[f"model/{e.fqn}"] = ("plain", p.detach())
        st = optimizer.state.get(e.opt_tensor, {}) if optimizer is not None else {}
        for name, v in st.items():
            if not isinstance(v, Tensor):
                objects.setdefault(e.fqn, {})[name] = v
                continue
            v_local = local_of(e, v)
            if state_is_row_sharded(
                optimizer, name, v_local, e.shape if len(e.shape) else torch.Size([1])
            ):
                gshape = (e.rows, *tuple(v_local.shape[1:]))
                if e.bounds is None:
                    spec: Spec = (
                        "plain",
                        v_local.reshape(gshape) if v_local.dim() == 0 else v_local,
                    )
                else:
                    spec = ("rows", v_local, gshape, e.bounds, e.rank, e.group)
                kind = "rows"
            else:
                gshape, spec, kind = tuple(v_local.shape), ("plain", v_local), "replicated"
            specs[f"optim/{e.fqn}/{name}"] = spec
            state_meta.setdefault(e.fqn, {})[name] = {
                "kind": kind, "shape": list(gshape), "dtype": str(v_local.dtype).replace("torch.", ""),
            }  # fmt: skip
        if fmt.has_master(e):  # ZeRO master copy (e.g. fp32 rows of a bf16 parameter)
            ot = e.opt_tensor.detach()
            specs[f"master/{e.fqn}"] = (
                "rows",
                ot.reshape(-1) if len(e.shape) == 0 else ot,
                fmt.master_shape(e),
                e.bounds,
                e.rank,
                e.group,
            )
    return specs, state_meta, objects, ents


def _accumulator_specs(
    acc_state: dict[str, Any], rank: int, world: int
) -> tuple[dict[str, Spec], dict[str, Any]]:
    """The window's gradient sum as DCP entries ``acc/<name>``, each rank writing a
    ``torch.chunk`` share of the rows (the sum is the same on every rank)."""
    grads = acc_state.get("grads") or {}
    specs: dict[str, Spec] = {}
    info: dict[str, Any] = {}
    for name, g in grads.items():
        g = g.detach()
        flat = g.reshape(1) if g.dim() == 0 else g
        gshape = tuple(flat.shape)
        info[name] = {"shape": list(g.shape), "dtype": str(g.dtype).replace("torch.", "")}
        if world > 1:
            bounds = _chunk_bounds(gshape[0], world)
            s, t = bounds[rank]
            specs[f"acc/{name}"] = ("rows", flat[s:t], gshape, bounds, rank, None)
        else:
            specs[f"acc/{name}"] = ("plain", flat)
    meta = {k: v for k, v in acc_state.items() if k != "grads"}
    meta["grads"] = info
    meta["grads_in"] = "dcp"
    return specs, meta


def _nbytes(spec: Spec) -> int:
    if spec[0] == "rows":
        return math.prod(spec[2]) * spec[1].element_size()
    return spec[1].numel() * spec[1].element_size()


# Snapshot buffers of asynchronous saves, kept from one save to the next (as DCP's stager does
# with cache_staged_state_dict): copying into memory already touched costs a fraction of
# allocating it anew.  Safe because a save waits for the previous one before it copies.
_STAGING: dict[str, Tensor] = {}


def release_staging() -> None:
    """Free the snapshot buffers kept by asynchronous saves (after waiting for the one in flight)."""
    wait()
    _STAGING.clear()


def _materialize(specs: dict[str, Spec], copy: bool) -> dict[str, Any]:
    """DCP's state dict; ``copy``: a snapshot on CPU (pinned memory for GPU tensors), in
    buffers reused from the previous asynchronous save when the shapes agree."""
    cuda = False
    rank, world = _rank(), _world()
    if copy:
        for k in set(_STAGING) - set(specs):
            del _STAGING[k]

    def snap(t: Tensor, key: str = "") -> Tensor:
        nonlocal cuda
        if not copy:
            return t
        buf = _STAGING.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            _STAGING[key] = buf
        cuda = cuda or t.is_cuda
        buf.copy_(t, non_blocking=t.is_cuda)
        return buf

    out: dict[str, Any] = {}
    for key, spec in specs.items():
        if spec[0] == "rows":
            _, local, gshape, bounds, r, group = spec
            out[key] = fmt.row_sharded(snap(local, key), gshape, bounds, r, group)
        elif spec[0] == "dtensor" and copy:
            _, t, bounds, r, group = spec
            local = snap(t.to_local(), key)
            # sharded: the same rows as a sharded tensor; replicated: the local copy is complete
            out[key] = (
                local
                if bounds is None
                else fmt.row_sharded(local, tuple(t.shape), bounds, r, group)
            )
        elif copy and world > 1 and spec[1].dim() >= 1:
            # complete on every rank: each rank copies and writes a torch.chunk share of the rows
            # (DCP would write one rank's copy anyway), so the snapshot costs 1/world of it
            t = spec[1]
            bounds = _chunk_bounds(t.shape[0], world)
            s0, s1 = bounds[rank]
            out[key] = fmt.row_sharded(snap(t[s0:s1], key), tuple(t.shape), bounds, rank)
        else:
            out[key] = snap(spec[1], key)
    if cuda:
        torch.cuda.synchronize()
    return out


def _infer_step(optimizer: Any, scheduler: Any, extra: Any) -> int | None:
    if isinstance(extra, dict) and isinstance(extra.get("step"), int):
        return extra["step"]
    if scheduler is not None and hasattr(scheduler, "last_epoch"):
        return int(scheduler.last_epoch)
    if optimizer is not None:
        steps = [
            float(s["step"])
            for s in optimizer.state.values()
            if isinstance(s, dict) and "step" in s
        ]
        if steps:
            return int(max(steps))
    return None


def _meta_bytes(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    extra: Any,
    ents: list[Entry],
    state_meta: dict,
    objects: dict,
    acc_meta: Any,
) -> bytes:
    def cls(o: Any) -> str | None:
        return None if o is None else f"{type(o).__module__}.{type(o).__qualname__}"

    meta = {
        "format": fmt.FORMAT_VERSION,
        "distopt_version": __version__,
        "torch_version": torch.__version__,
        "world_size": _world(),
        "mode": detect_mode(model, optimizer),
        "time": time.time(),
        "params": {e.fqn: list(e.shape) for e in ents},
        "dtypes": {e.fqn: str(e.param.dtype).replace("torch.", "") for e in ents},
        "optimizer_class": cls(optimizer),
        "param_groups": None if optimizer is None else fmt.param_groups_by_name(optimizer, ents),
        "state_meta": state_meta,
        "objects": objects,
        "scheduler_class": cls(scheduler),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "accumulator": acc_meta,
        "extra": extra,
        "step": _infer_step(optimizer, scheduler, extra),
    }
    buf = io.BytesIO()
    torch.save(meta, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- async bookkeeping


class _Pending:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None
        self.thread: threading.Thread | None = None


_PENDING: _Pending | None = None
_ASYNC_GROUP: Any = None
_ATEXIT = False


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


def _async_group() -> Any:
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None and dist_on():
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


# --------------------------------------------------------------------------- save


def _no_stage(name: str) -> None:
    """The default of ``save``'s ``_on_stage``: nothing happens between the phases."""


def save(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    accumulator: Any = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = True,
    async_: bool = False,
    _on_commit: Callable[[Path], None] | None = None,
    _on_stage: Callable[[str], None] | None = None,
) -> Path:
    """Save everything needed to resume, collectively over all ranks; returns the folder.

    Each rank writes its own rows of sharded tensors in parallel (no rank materialises the full
    optimizer state); the checkpoint becomes visible under ``path`` only once complete: it is
    written to ``<path>.partial`` and renamed after the commit marker is on disk.  A crash at any
    point leaves the previous checkpoint at ``path`` (if any) intact and loadable.  A failure on
    any rank (full disk, permissions, ...) raises :class:`CheckpointError` on every rank, naming
    the rank, the file and the cause, and removes ``<path>.partial``.

    Args:
        path: the checkpoint folder.
        model: the model as used for training (plain, DDP, ``distopt.shard``'s, or FSDP2).
        optimizer: its optimizer (distopt or torch.optim), or None to save the model only.
        scheduler: an LR scheduler (anything with ``state_dict``), saved with ``last_epoch``,
            ``base_lrs`` and the groups' ``initial_lr``.
        accumulator: a :class:`distopt.GradientAccumulator` (its micro-step position; in the
            middle of a window its gradient sum, as sharded tensors).
        extra: picklable user data (epoch, data-loader position, tokens seen, ...).
        overwrite: replace an existing checkpoint at ``path`` (default True).
        async_: take a snapshot of the state (a CPU copy; pinned memory for GPU tensors) and
            write it in a background thread, returning as soon as the snapshot is taken.  At
            most one save is in flight: the next ``save`` (or :func:`wait`, or interpreter exit)
            waits for it, and raises its error on every rank if it failed.  Call :func:`wait`
            before ``destroy_process_group``.
    """
    global _PENDING, _ATEXIT
    wait()  # at most one in flight; surfaces the previous async save's failure
    path = Path(path)
    rank, world = _rank(), _world()
    tmp = path.with_name(path.name + ".partial")
    err = None
    if rank == 0:
        try:
            if path.exists() and not overwrite:
                err = f"checkpoint {path} exists and overwrite=False"
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
        except OSError as exc:
            err = describe(exc, tmp)
    stage = _on_stage or _no_stage
    stage("start")
    specs: dict[str, Spec] = {}
    meta_bytes = rng_bytes = None
    try:
        specs, state_meta, objects, ents = _collect(model, optimizer)
        buf = io.BytesIO()
        torch.save(fmt.rng_state(), buf)
        rng_bytes = buf.getvalue()
    except Exception as exc:  # noqa: BLE001 - agreed below
        err = err or describe(exc)
    # in the middle of an accumulation window this is a collective: every rank calls it
    acc_state = acc_meta = None
    if accumulator is not None:
        try:
            acc_state = accumulator.state_dict()
        except Exception as exc:  # noqa: BLE001
            err = err or describe(exc)
    if err is None and acc_state is not None:
        acc_specs, acc_meta = _accumulator_specs(acc_state, rank, world)
        specs.update(acc_specs)
    if err is None and rank == 0:
        try:
            meta_bytes = _meta_bytes(
                model, optimizer, scheduler, extra, ents, state_meta, objects, acc_meta
            )
        except Exception as exc:  # noqa: BLE001
            err = describe(exc)
    _agree_or_clean(err, tmp, None, f"cannot save checkpoint {path}")
    needs = sum(_nbytes(s) for s in specs.values())
    job = dict(
        path=path,
        tmp=tmp,
        rng_bytes=rng_bytes,
        meta_bytes=meta_bytes,
        needs=needs,
        on_commit=_on_commit,
        on_stage=stage,
    )
    if not async_:
        _write_and_commit(tensors=_materialize(specs, copy=False), group=None, **job)
        return path

    group = _async_group()  # collective the first time
    tensors = _materialize(specs, copy=True)
    pending = _Pending(path)

    def run() -> None:
        try:
            _write_and_commit(tensors=tensors, group=group, **job)
        except CheckpointError as exc:
            pending.error = str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported at the next save/wait
            pending.error = f"asynchronous save of {path} failed: {describe(exc)}"

    pending.thread = threading.Thread(target=run, name="distopt-async-save", daemon=False)
    _PENDING = pending
    if not _ATEXIT:
        atexit.register(_wait_at_exit)
        _ATEXIT = True
    pending.thread.start()
    return path


def _agree_or_clean(err: str | None, tmp: Path, group: Any, what: str) -> None:
    """Agree on ``err``; when any rank failed, rank 0 removes ``tmp`` before all raise."""
    try:
        agree(err, group=group, what=what)
    except CheckpointError:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_file(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        os.close(fd)


def _write_and_commit(
    *,
    path: Path,
    tmp: Path,
    tensors: dict[str, Any],
    rng_bytes: bytes,
    meta_bytes: bytes | None,
    needs: int,
    group: Any,
    on_commit: Callable[[Path], None] | None,
    on_stage: Callable[[str], None],
) -> None:
    """Phase "files": RNG file, metadata (rank 0), DCP tensors, then fsync of the small files;
    one all-gather agrees on the outcome and brings every rank's CRC segments to rank 0.
    Phase "commit": rank 0 writes the marker and renames; one all-gather agrees on that."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException

    rank, world = _rank(), _world()
    t0 = time.perf_counter()
    free0 = free_bytes(tmp)
    what = f"saving checkpoint {path} failed"
    writer = ChecksumWriter(tmp)
    rng_name = f"rng/rank-{rank}.pt"
    small = [(rng_name, rng_bytes)] + ([(fmt.META, meta_bytes)] if meta_bytes is not None else [])
    err = None
    try:  # the small files first, so that they are on their way to the disk while DCP writes
        for name, data in small:
            _write_file(tmp / name, data)
    except OSError as exc:
        err = describe(exc, tmp, needs, free0)
    try:  # collective: every rank takes part even when its small files failed (never a hang)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=not dist_on())
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch's is a BaseException
        err = err or describe(exc, tmp, needs, free0)
    finally:
        writer.close()
    if err is None:
        try:
            for name, _ in small:
                _fsync_file(tmp / name)
        except OSError as exc:
            err = describe(exc, tmp, needs, free0)
    mine = {
        n: {"size": sum(s[1] for s in segs), "segments": segs}
        for n, segs in writer.segments.items()
    }
    mine.update({n: {"size": len(d), "segments": whole(d)} for n, d in small})
    gathered = gather_objects((err, mine), group)
    try:
        raise_gathered([(e, False) for e, _ in gathered], what + " writing files")
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    on_stage("tensors_written")
    on_stage("meta_written")

    err = None
    if rank == 0:
        try:
            files: dict[str, Any] = {}
            for _, part in gathered:
                files.update(part)
            for f in sorted(tmp.iterdir()):  # DCP's .metadata
                if f.is_file() and f.name not in files and f.name != fmt.MARKER:
                    data = f.read_bytes()
                    files[f.name] = {"size": len(data), "segments": whole(data)}
            marker = {
                "format": fmt.FORMAT_VERSION,
                "world_size": world,
                "time": time.time(),
                "files": files,
            }
            write_atomic_bytes(tmp / fmt.MARKER, json.dumps(marker, separators=(",", ":")).encode())
            fsync_dir(tmp)
            fsync_dir(tmp / "rng")
            on_stage("marker_written")
            old = None
            if path.exists():
                old = path.with_name(path.name + f".old-{os.getpid()}")
                os.replace(path, old)
                on_stage("old_moved_aside")
            os.replace(tmp, path)
            fsync_dir(path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            log.info("saved checkpoint %s (%d ranks, %.2fs)", path, world, time.perf_counter() - t0)
        except OSError as exc:
            err = describe(exc, tmp / fmt.MARKER, needs, free0)
            shutil.rmtree(tmp, ignore_errors=True)
        if err is None and on_commit is not None:
            try:
                on_commit(path)
            except OSError as exc:
                err = f"checkpoint {path} is committed, but moving the 'latest' pointer failed: {describe(exc)}"
    agree(err, group=group, what=what + " committing")
