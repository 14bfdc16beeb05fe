"""``save``: collective, atomic, optionally asynchronous; every phase agreed across ranks.

Phases, all inside one ``torch.distributed.checkpoint.save`` (no collective of distopt's own)::

    collect   every rank takes its view of the state (accumulator mid-window: a collective)
    [async: ``save`` returns here; a thread copies the state (pinned memory for GPU tensors)
     while training continues (every optimizer ``step`` waits for that copy first), then runs
     the rest, with its collectives on a dedicated gloo group]
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
from torch import Tensor, nn

from distopt._dtensor import is_dtensor
from distopt._version import __version__
from distopt.checkpoint import _async
from distopt.checkpoint import _save_load as fmt
from distopt.checkpoint._common import (
    CheckpointError,
    describe,
    dist_on,
    failure_message,
    free_bytes,
    fsync_dir,
    gc_paused,
    write_atomic_bytes,
)
from distopt.checkpoint._common import (
    rank as _rank,
)
from distopt.checkpoint._common import (
    world as _world,
)
from distopt.checkpoint._direct import SavePlanner
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


def _materialize(specs: dict[str, Spec], copy: bool = False) -> dict[str, Any]:
    """DCP's state dict for ``specs`` (``copy``: of a snapshot taken now, see ``_stage``)."""
    if copy:
        specs = _async.stage(specs)
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
            write it in a background thread.  The copy itself is made in the background too
            (GPU copies are enqueued on the tensors' stream): ``save`` returns at once, and
            every optimizer's next ``step`` waits for the copy to finish before it writes (a
            global ``torch.optim`` step pre-hook), so the checkpoint holds the state of the
            moment ``save`` was called.  Code that writes parameters or optimizer state in
            place outside ``step`` before that calls :func:`wait_snapshot` first.  With no
            optimizer, or one that changes parameters outside ``step`` (schedule-free
            ``train``/``eval``), and for a mid-window accumulator's gradient sum, the copy is
            made before ``save`` returns.  At most one save is in flight: the next ``save``
            (or :func:`wait`, or interpreter exit) waits for it, and raises its error on every
            rank if it failed (also an error found before the write, such as
            ``overwrite=False`` on an existing folder).  Call :func:`wait` before
            ``destroy_process_group``.
    """
    _async.wait()  # at most one in flight; surfaces the previous async save's failure
    path = Path(path)
    rank, world = _rank(), _world()
    tmp = path.with_name(path.name + ".partial")
    err = None
    stage = _on_stage or _no_stage
    stage("start")
    specs: dict[str, Spec] = {}
    meta_bytes: bytes | Callable[[], bytes] | None = None
    rng_bytes = None
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

        def make_meta() -> bytes:
            return _meta_bytes(
                model, optimizer, scheduler, extra, ents, state_meta, objects, acc_meta
            )

        if async_:  # training goes on after save returns: pickled now
            try:
                meta_bytes = make_meta()
            except Exception as exc:  # noqa: BLE001
                err = describe(exc)
        else:  # pickled by the small-files thread while DCP plans and writes (the caller waits)
            meta_bytes = make_meta
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
        with gc_paused():
            _write_and_commit(tensors=_materialize(specs), group=None, own_crc_only=True, **job)
        return path

    group = _async.async_group()  # collective the first time
    # the snapshot: the accumulator's gradient sum (backward adds into it) is copied now; the
    # rest, when every later write goes through a guarded optimizer step, in the background
    deferred: list[Any] | None = [] if _async.copies_in_background(optimizer) else None
    staged = _async.stage(specs, deferred, now=("acc/",))
    pending = _async._Pending(path)
    if deferred:
        _async.install_step_guard()
    else:
        pending.staged.set()

    def run() -> None:
        try:
            copy_error = None
            try:
                if deferred:
                    _async.run_deferred(deferred)
            except Exception as exc:  # noqa: BLE001 - every rank learns of it in DCP's planning
                copy_error = f"taking the snapshot: {describe(exc)}"
            finally:
                pending.staged.set()
            if copy_error is not None:
                job["prepare_error"] = job["prepare_error"] or copy_error
            tensors = {} if copy_error else _materialize(staged)
            _write_and_commit(tensors=tensors, group=group, **job)
        except CheckpointError as exc:
            pending.error = str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported at the next save/wait
            pending.error = f"asynchronous save of {path} failed: {describe(exc)}"

    pending.thread = threading.Thread(target=run, name="distopt-async-save", daemon=False)
    _async.start(pending)
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
    meta_bytes: bytes | Callable[[], bytes] | None,
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
            dcp.save(tensors, storage_writer=writer, planner=SavePlanner(), process_group=group,
                     no_dist=not dist_on())  # fmt: skip
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
