"""``save``: collective, atomic, optionally asynchronous; every phase agreed across ranks.

Phases, all inside one ``torch.distributed.checkpoint.save`` (no collective of distopt's own)::

    collect   every rank takes its view of the state (accumulator mid-window: a collective)
    [async: the state is copied (pinned memory for GPU tensors); the rest runs in a thread,
     with its collectives on a dedicated gloo group, while training continues]
    prepare   rank 0 creates <path>.partial; any rank's error so far is raised in DCP's
              planning step (so every rank learns of it there)
    files     DCP writes every rank's rows, CRC32 computed on the fly (``ChecksumWriter``);
              beside them every rank writes rng/rank-<r>.pt and rank 0 distopt_meta.pt
    commit    in DCP's finish (rank 0, after every rank's write succeeded): .metadata, then
              COMMITTED with every file's size and CRC segments (which rode to rank 0 in DCP's
              write results), the rename of <path>.partial to <path>, the manager's ``latest``

DCP's own collectives bring a failure in any phase on any rank to every rank: the same
:class:`CheckpointError` (rank, file, cause in words) everywhere, and the ``.partial`` folder
is removed.
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
    describe,
    dist_on,
    failure_message,
    free_bytes,
    fsync_dir,
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
from distopt.checkpoint._storage import ChecksumWriter, file_entry

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


def _stage(specs: dict[str, Spec]) -> dict[str, Spec]:
    """A snapshot of the tensors for an asynchronous save: plain copies on CPU (pinned host
    memory for GPU tensors, one device sync), in buffers reused from the previous asynchronous
    save when the shapes agree.  Only the raw rows are copied here; building DCP's sharded
    views of them (``_materialize``) is left to the background thread."""
    cuda = False
    rank, world = _rank(), _world()
    for k in set(_STAGING) - set(specs):
        del _STAGING[k]

    def snap(t: Tensor, key: str) -> Tensor:
        nonlocal cuda
        buf = _STAGING.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            _STAGING[key] = buf
        cuda = cuda or t.is_cuda
        buf.copy_(t, non_blocking=t.is_cuda)
        return buf

    out: dict[str, Spec] = {}
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
            # complete on every rank: each rank copies and writes a torch.chunk share of the rows
            # (DCP would write one rank's copy anyway), so the snapshot costs 1/world of it
            t = spec[1]
            bounds = _chunk_bounds(t.shape[0], world)
            s0, s1 = bounds[rank]
            out[key] = ("rows", snap(t[s0:s1], key), tuple(t.shape), bounds, rank, None)
        else:
            out[key] = ("plain", snap(spec[1], key))
    if cuda:
        torch.cuda.synchronize()
    return out


def _materialize(specs: dict[str, Spec], copy: bool = False) -> dict[str, Any]:
    """DCP's state dict for ``specs`` (``copy``: of a snapshot taken now, see ``_stage``)."""
    if copy:
        specs = _stage(specs)
    out: dict[str, Any] = {}
    for key, spec in specs.items():
        if spec[0] == "rows":
            _, local, gshape, bounds, r, group = spec
            out[key] = fmt.row_sharded(local, gshape, bounds, r, group)
        else:  # a plain tensor, or a DTensor DCP saves as it is
            out[key] = spec[1]
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
            waits for it, and raises its error on every rank if it failed (also an error found
            before the write, such as ``overwrite=False`` on an existing folder).  Call
            :func:`wait` before ``destroy_process_group``.
    """
    global _PENDING, _ATEXIT
    wait()  # at most one in flight; surfaces the previous async save's failure
    path = Path(path)
    rank, world = _rank(), _world()
    tmp = path.with_name(path.name + ".partial")
    err = None
    stage = _on_stage or _no_stage
    stage("start")
    specs: dict[str, Spec] = {}
    meta_bytes = rng_bytes = None
    try:
        specs, state_meta, objects, ents = _collect(model, optimizer)
        buf = io.BytesIO()
        torch.save(fmt.rng_state(), buf)
        rng_bytes = buf.getvalue()
    except Exception as exc:  # noqa: BLE001 - raised on every rank inside DCP's planning
        err = describe(exc)
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
    if err is not None:
        specs = {}
    job = dict(
        path=path,
        tmp=tmp,
        rng_bytes=rng_bytes,
        meta_bytes=meta_bytes,
        needs=sum(_nbytes(s) for s in specs.values()),
        on_commit=_on_commit,
        on_stage=stage,
        prepare_error=err,
        overwrite=overwrite,
    )
    if not async_:
        _write_and_commit(tensors=_materialize(specs), group=None, own_crc_only=True, **job)
        return path

    group = _async_group()  # collective the first time
    staged = _stage(specs)  # the only copy; everything else runs in the background
    pending = _Pending(path)

    def run() -> None:
        try:
            _write_and_commit(tensors=_materialize(staged), group=group, **job)
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


def _prepare_folder(path: Path, tmp: Path, overwrite: bool) -> str | None:
    """Rank 0: a fresh ``<path>.partial``; the error in words, if any."""
    try:
        if path.exists() and not overwrite:
            return f"checkpoint {path} exists and overwrite=False"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return describe(exc, tmp)
    return None


def _write_and_commit(
    *,
    path: Path,
    tmp: Path,
    tensors: dict[str, Any],
    rng_bytes: bytes | None,
    meta_bytes: bytes | None,
    needs: int,
    group: Any,
    on_commit: Callable[[Path], None] | None,
    on_stage: Callable[[str], None],
    prepare_error: str | None,
    overwrite: bool,
    own_crc_only: bool = False,
) -> None:
    """One ``dcp.save`` carries every phase and its cross-rank agreement: an error from before
    the write is raised in DCP's planning step; the RNG file (every rank) and the metadata
    (rank 0) are written and synced beside DCP's tensors; the CRC segments ride to rank 0 in
    DCP's write results; rank 0's commit (marker, rename, ``on_commit``) runs in DCP's
    ``finish``.  DCP's collectives bring any rank's failure to every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException

    rank, world = _rank(), _world()
    t0 = time.perf_counter()
    if rank == 0:  # before DCP's planning step, which every rank's writes follow
        prepare_error = prepare_error or _prepare_folder(path, tmp, overwrite)
    free0 = free_bytes(tmp)
    small = [(f"rng/rank-{rank}.pt", rng_bytes)] if rng_bytes is not None else []
    if meta_bytes is not None:
        small.append((fmt.META, meta_bytes))

    def commit(files: dict[str, Any]) -> None:  # rank 0, inside DCP's finish
        try:
            _commit(path, tmp, files, world, on_stage)
        except OSError as exc:
            raise CheckpointError(
                f"committing: {describe(exc, tmp / fmt.MARKER, needs, free0)}"
            ) from exc
        log.info("saved checkpoint %s (%d ranks, %.2fs)", path, world, time.perf_counter() - t0)
        if on_commit is not None:
            try:
                on_commit(path)
            except OSError as exc:
                raise CheckpointError(f"checkpoint {path} is committed, but moving the 'latest' "
                                      f"pointer failed: {describe(exc)}") from exc  # fmt: skip

    writer = ChecksumWriter(tmp, prepare_error=prepare_error, small=small, commit=commit,
                            needs=needs, free0=free0)  # fmt: skip
    # One CRC32 per byte: distopt's own (``ChecksumWriter``, checked on load) replaces the zip
    # records' CRC32 that ``torch.save`` computes for every item and ``torch.load`` never checks.
    # The switch is process-wide, so only a synchronous save (the caller's thread waits here)
    # turns it off; an asynchronous one, writing while training goes on, leaves it alone.
    zip_crc = torch.serialization.get_crc32_options()
    if own_crc_only:
        torch.serialization.set_crc32_options(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=not dist_on())
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch's is a BaseException
        msg, _ = failure_message(exc)
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving checkpoint {path} failed: {msg}") from None
    finally:
        if own_crc_only:
            torch.serialization.set_crc32_options(zip_crc)
        writer.close()


def _commit(
    path: Path, tmp: Path, files: dict[str, Any], world: int, on_stage: Callable[[str], None]
) -> None:
    """Rank 0: the commit marker (every file's size and CRC segments), then the rename."""
    on_stage("tensors_written")
    on_stage("meta_written")
    names = [f"rng/rank-{r}.pt" for r in range(world)] + [fmt.META]
    for name in names:  # a rank with no tensor to write sent no entry: read its file here
        if name not in files and (tmp / name).is_file():
            files[name] = file_entry((tmp / name).read_bytes())
    marker = {"format": fmt.FORMAT_VERSION, "world_size": world, "time": time.time(),
              "files": files}  # fmt: skip
    write_atomic_bytes(tmp / fmt.MARKER, json.dumps(marker, separators=(",", ":")).encode())
    fsync_dir(tmp)  # rng/ was synced by each rank after its RNG file
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
