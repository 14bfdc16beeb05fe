"""Collective, reshardable, crash-safe save and load on top of torch.distributed.checkpoint.

On disk, a checkpoint is a folder::

    .metadata, __<rank>_<n>.distcp    DCP: model tensors and optimizer state tensors, logical keys
    distopt_meta.pt                   param groups (by parameter name), scheduler, accumulator,
                                      non-tensor optimizer state, user ``extra``, how it was saved
    rng/rank-<r>.pt                   each rank's RNG streams
    COMMITTED                         JSON commit marker: written last, lists every file with its
                                      size and CRC32

Keys are logical: ``model/<fqn>``, ``optim/<fqn>/<state name>``, ``master/<fqn>``.  Row-sharded
tensors (ZeRO, FSDP2) are written by their owners in parallel as DCP shards of the global
tensor; replicated ones are written once.  Any layout can read any other: DCP computes which
saved chunks overlap the rows a rank needs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt._version import __version__
from distopt.checkpoint._layout import Entry, detect_mode, entries, local_of, state_is_row_sharded

log = logging.getLogger("distopt.checkpoint")

MARKER = "COMMITTED"
META = "distopt_meta.pt"
FORMAT_VERSION = 1


#: Test hook: called with the name of each stage of :func:`save` (fault-injection tests kill
#: the process there to prove that an interrupted save never damages the previous checkpoint).
FAULT_HOOK: Any = None


def _stage(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupted, or does not fit the model/optimizer."""


# --------------------------------------------------------------------------- distributed helpers


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _world() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _gather_objects(obj: Any) -> list[Any]:
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any) -> Any:
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_agreed(err: str | None) -> None:
    """Raise the same error on every rank if any rank has one."""
    errs = [e for e in _gather_objects(err) if e]
    if errs:
        raise CheckpointError(errs[0])


# --------------------------------------------------------------------------- sharded tensors


def _row_sharded(local: Tensor, gshape: tuple[int, ...], bounds: list[tuple[int, int]], rank: int) -> Any:
    """A DCP-savable view of a tensor split by dim-0 rows (arbitrary, uneven bounds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
        from torch.distributed._shard.sharded_tensor.metadata import (
            ShardedTensorMetadata,
            TensorProperties,
        )

        dev = local.device
        metas, shards = [], []
        for r, (s, e) in enumerate(bounds):
            if e <= s:
                continue
            where = str(dev) if r == rank else dev.type
            m = ShardMetadata([s] + [0] * (len(gshape) - 1), [e - s] + list(gshape[1:]), f"rank:{r}/{where}")
            metas.append(m)
            if r == rank:
                shards.append(Shard(local.contiguous(), m))
        props = TensorProperties(
            dtype=local.dtype, layout=torch.strided, requires_grad=False,
            memory_format=torch.contiguous_format, pin_memory=False,
        )  # fmt: skip
        gm = ShardedTensorMetadata(metas, torch.Size(gshape), props)
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, gm)


def _logical_rows_shape(e: Entry, v: Tensor) -> tuple[int, ...]:
    return (e.rows, *tuple(v.shape[1:]))


def _local_rows(e: Entry) -> tuple[int, int]:
    if e.bounds is None:
        return 0, e.rows
    return e.bounds[e.rank]


# --------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError):
            log.warning("could not restore CUDA RNG states (different number of devices)")
    if "numpy" in st:
        try:
            import numpy as np

            np.random.set_state(st["numpy"])
        except ImportError:
            pass


# --------------------------------------------------------------------------- file integrity


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


def _fsync_dir(path: Path) -> None:
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


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- save


def _collect(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict, list[Entry]]:
    ents = entries(model, optimizer)
    tensors: dict[str, Any] = {}
    state_meta: dict[str, dict[str, dict[str, Any]]] = {}
    objects: dict[str, dict[str, Any]] = {}
    for e in ents:
        p = e.param
        tensors[f"model/{e.fqn}"] = p.detach() if type(p).__name__ != "DTensor" else p
        st = optimizer.state.get(e.opt_tensor, {}) if optimizer is not None else {}
        for name, v in st.items():
            if not isinstance(v, Tensor):
                objects.setdefault(e.fqn, {})[name] = v
                continue
            v_local = local_of(e, v)
            if state_is_row_sharded(optimizer, name, v_local, e.shape if len(e.shape) else torch.Size([1])):
                gshape = _logical_rows_shape(e, v_local)
                if e.bounds is None:
                    val: Any = v_local.reshape(gshape) if v_local.dim() == 0 else v_local
                else:
                    val = _row_sharded(v_local, gshape, e.bounds, e.rank)
                kind = "rows"
            else:
                gshape = tuple(v_local.shape)
                val, kind = v_local, "replicated"
            tensors[f"optim/{e.fqn}/{name}"] = val
            state_meta.setdefault(e.fqn, {})[name] = {
                "kind": kind, "shape": list(gshape), "dtype": str(v_local.dtype).replace("torch.", ""),
            }  # fmt: skip
        if _has_master(e):  # ZeRO master copy (e.g. fp32 rows of a bf16 parameter)
            ot = e.opt_tensor.detach()
            tensors[f"master/{e.fqn}"] = _row_sharded(ot.reshape(-1) if len(e.shape) == 0 else ot, _master_shape(e), e.bounds, e.rank)
    return tensors, state_meta, objects, ents


def _has_master(e: Entry) -> bool:
    return e.bounds is not None and e.opt_tensor.dtype != e.param.dtype


def _master_shape(e: Entry) -> tuple[int, ...]:
    return (e.rows, *e.shape[1:])


def _param_groups_by_name(optimizer: torch.optim.Optimizer, ents: list[Entry]) -> list[dict[str, Any]]:
    name_of = {id(e.opt_tensor): e.fqn for e in ents}
    groups = []
    for g in optimizer.param_groups:
        d = {k: v for k, v in g.items() if k != "params"}
        d["params"] = [name_of.get(id(p), f"<unnamed:{i}>") for i, p in enumerate(g["params"])]
        groups.append(d)
    return groups


def save(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    accumulator: Any = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save everything needed to resume, collectively over all ranks; returns the folder.

    Each rank writes its own rows of sharded tensors in parallel (no rank materialises the full
    optimizer state); the checkpoint becomes visible under ``path`` only once complete: it is
    written to ``<path>.partial`` and renamed after the commit marker is on disk.  A crash at any
    point leaves the previous checkpoint at ``path`` (if any) intact and loadable.

    Args:
        path: the checkpoint folder.
        model: the model as used for training (plain, DDP, ``distopt.shard``'s, or FSDP2).
        optimizer: its optimizer (distopt or torch.optim), or None to save the model only.
        scheduler: an LR scheduler (anything with ``state_dict``), saved with ``last_epoch``,
            ``base_lrs`` and the groups' ``initial_lr``.
        accumulator: a :class:`distopt.GradientAccumulator` (its micro-step position).
        extra: picklable user data (epoch, data-loader position, tokens seen, ...).
        overwrite: replace an existing checkpoint at ``path`` (default True).
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    rank, world = _rank(), _world()
    tmp = path.with_name(path.name + ".partial")
    err = None
    if rank == 0:
        if path.exists() and not overwrite:
            err = f"checkpoint {path} exists and overwrite=False"
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "rng").mkdir()
    _raise_agreed(err)
    _barrier()

    t0 = time.perf_counter()
    _stage("start")
    tensors, state_meta, objects, ents = _collect(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not _dist_on())
    _stage("tensors_written")
    torch.save(_rng_state(), tmp / "rng" / f"rank-{rank}.pt")
    # collective in the middle of an accumulation window: every rank calls it
    acc_state = None if accumulator is None else accumulator.state_dict()

    if rank == 0:
        meta = {
            "format": FORMAT_VERSION,
            "distopt_version": __version__,
            "torch_version": torch.__version__,
            "world_size": world,
            "mode": detect_mode(model, optimizer),
            "time": time.time(),
            "params": {e.fqn: list(e.shape) for e in ents},
            "dtypes": {e.fqn: str(e.param.dtype).replace("torch.", "") for e in ents},
            "optimizer_class": None if optimizer is None else f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "param_groups": None if optimizer is None else _param_groups_by_name(optimizer, ents),
            "state_meta": state_meta,
            "objects": objects,
            "scheduler_class": None if scheduler is None else f"{type(scheduler).__module__}.{type(scheduler).__qualname__}",
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "accumulator": acc_state,
            "extra": extra,
            "step": _infer_step(optimizer, scheduler, extra),
        }
        buf = io.BytesIO()
        torch.save(meta, buf)
        _write_atomic_bytes(tmp / META, buf.getvalue())
    _stage("meta_written")
    _barrier()

    # integrity record: each rank checksums the data files it wrote, rank 0 the rest
    mine = sorted(f for f in tmp.iterdir() if f.is_file() and f.name.startswith(f"__{rank}_"))
    sums = {f.name: [f.stat().st_size, _crc32(f)] for f in mine}
    sums.update({f"rng/{f.name}": [f.stat().st_size, _crc32(f)] for f in [tmp / "rng" / f"rank-{rank}.pt"]})
    all_sums: dict[str, list[int]] = {}
    for part in _gather_objects(sums):
        all_sums.update(part)
    if rank == 0:
        for f in sorted(tmp.iterdir()):
            if f.is_file() and f.name not in all_sums and f.name != MARKER:
                all_sums[f.name] = [f.stat().st_size, _crc32(f)]
        marker = {"world_size": world, "files": all_sums, "time": time.time(), "format": FORMAT_VERSION}
        _write_atomic_bytes(tmp / MARKER, json.dumps(marker, indent=1).encode())
        _fsync_dir(tmp)
        _stage("marker_written")
        old = None
        if path.exists():
            old = path.with_name(path.name + f".old-{os.getpid()}")
            os.replace(path, old)
            _stage("old_moved_aside")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s (%d ranks, %.2fs)", path, world, time.perf_counter() - t0)
    _barrier()
    return path


def _infer_step(optimizer: Any, scheduler: Any, extra: Any) -> int | None:
    if isinstance(extra, dict) and isinstance(extra.get("step"), int):
        return extra["step"]
    if scheduler is not None and hasattr(scheduler, "last_epoch"):
        return int(scheduler.last_epoch)
    if optimizer is not None:
        steps = [
            float(s["step"]) for s in optimizer.state.values() if isinstance(s, dict) and "step" in s
        ]
        if steps:
            return int(max(steps))
    return None


# --------------------------------------------------------------------------- load


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a committed checkpoint (its commit marker exists)."""
    return (Path(path) / MARKER).is_file()


def resolve(path: str | os.PathLike) -> Path:
    """``path`` itself, or — if a save that was replacing it died between its two renames — the
    committed copy it left beside it (``<path>.partial`` is newer than ``<path>.old-*``)."""
    path = Path(path)
    if is_complete(path) or path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    if is_complete(partial):
        return partial
    olds = sorted(path.parent.glob(path.name + ".old-*"), key=lambda p: p.stat().st_mtime)
    for old in reversed(olds):
        if is_complete(old):
            return old
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a committed checkpoint (no distributed set-up needed)."""
    path = resolve(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (no {MARKER} marker: the save was interrupted)"
        )
    try:
        return torch.load(path / META, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - report which file is bad
        raise CheckpointError(f"cannot read {path / META}: {exc}") from exc


def verify(path: str | os.PathLike, files: list[str] | None = None) -> None:
    """Check sizes and CRC32 of the checkpoint's files against its commit marker."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read commit marker {path / MARKER}: {exc}") from exc
    for name, (size, crc) in marker["files"].items():
        if files is not None and name not in files:
            continue
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {f} is truncated or changed: {f.stat().st_size} bytes, expected {size}")
        if _crc32(f) != crc:
            raise CheckpointError(f"checkpoint file {f} is corrupted (CRC32 mismatch)")


def _check_model_fits(meta: dict[str, Any], ents: list[Entry]) -> str | None:
    saved = {k: tuple(v) for k, v in meta["params"].items()}
    here = {e.fqn: tuple(e.shape) for e in ents}
    missing = sorted(set(here) - set(saved))
    unexpected = sorted(set(saved) - set(here))
    mismatched = sorted(f"{k}: checkpoint {saved[k]} vs model {here[k]}" for k in set(saved) & set(here) if saved[k] != here[k])
    if not (missing or unexpected or mismatched):
        return None
    lines = ["the checkpoint does not fit the model:"]
    if missing:
        lines.append(f"  missing in checkpoint ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected in checkpoint ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatch ({len(mismatched)}): {'; '.join(mismatched)}")
    return "\n".join(lines)


def _template_rows(e: Entry, gshape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[Any, Tensor]:
    s, t = _local_rows(e)
    local = torch.zeros((t - s, *gshape[1:]), dtype=dtype, device=device)
    if e.bounds is None:
        return local, local
    return _row_sharded(local, gshape, e.bounds, e.rank), local


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    accumulator: Any = None,
    strict: bool = True,
    verify_files: bool = True,
    restore_rng: bool = True,
) -> Any:
    """Restore a checkpoint written by :func:`save` at any world size and mode; returns ``extra``.

    Collective over all ranks.  The model and optimizer may be arranged differently from when
    they were saved (another number of ranks; one process, DDP, ZeRO-1/2 or FSDP2): each rank
    reads just the rows it holds.  Raises :class:`CheckpointError` for an incomplete, truncated
    or corrupted checkpoint (naming the file), or one that does not fit the model (listing
    missing, unexpected and shape-mismatched parameter names).
    """
    import torch.distributed.checkpoint as dcp

    path = resolve(path)
    rank = _rank()
    err = None
    meta = None
    try:
        meta = read_meta(path)
        if verify_files:
            marker = json.loads((path / MARKER).read_text())
            names = sorted(marker["files"])
            verify(path, names[rank :: _world()])
    except CheckpointError as exc:
        err = str(exc)
    _raise_agreed(err)
    assert meta is not None

    ents = entries(model, optimizer)
    _raise_agreed(_check_model_fits(meta, ents) if strict else None)
    if optimizer is not None and meta["param_groups"] is None:
        _raise_agreed(f"{path} holds no optimizer state (saved with optimizer=None)")
    if optimizer is not None:
        _raise_agreed(_check_groups(meta, optimizer, ents))

    template: dict[str, Any] = {}
    installs: list[tuple[Entry, str, Tensor, str]] = []
    masters: list[tuple[Entry, Tensor]] = []
    saved_keys = set(meta["params"])
    for e in ents:
        if e.fqn not in saved_keys:
            continue
        p = e.param
        template[f"model/{e.fqn}"] = p.detach() if type(p).__name__ != "DTensor" else p
        if optimizer is None:
            continue
        dev = local_of(e, e.opt_tensor).device
        for name, info in meta["state_meta"].get(e.fqn, {}).items():
            dtype = getattr(torch, info["dtype"])
            gshape = tuple(info["shape"])
            if info["kind"] == "rows":
                if gshape[0] != e.rows:
                    _raise_agreed(f"state {e.fqn}/{name} has {gshape[0]} rows, the parameter {e.rows}")
                tpl, local = _template_rows(e, gshape, dtype, dev)
            else:
                local = torch.zeros(gshape, dtype=dtype, device=dev)
                tpl = local
            template[f"optim/{e.fqn}/{name}"] = tpl
            installs.append((e, name, local, info["kind"]))
        if _has_master(e):
            if f"master/{e.fqn}" in _saved_tensor_keys(path):
                tpl, local = _template_rows(e, _master_shape(e), e.opt_tensor.dtype, e.opt_tensor.device)
                template[f"master/{e.fqn}"] = tpl
                masters.append((e, local))
            else:
                masters.append((e, None))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            dcp.load(template, checkpoint_id=str(path), no_dist=not _dist_on())
    except Exception as exc:  # noqa: BLE001 - wrap with the folder's name
        raise CheckpointError(f"failed to read tensors from {path}: {exc}") from exc

    if optimizer is not None:
        _install_state(optimizer, meta, ents, installs)
    with torch.no_grad():
        for e, local in masters:  # restore saved master rows, else round up the loaded model's
            if local is None:
                s0, s1 = _local_rows(e)
                src = e.param.detach().reshape(-1) if len(e.shape) == 0 else e.param.detach()
                e.opt_tensor.copy_(src[s0:s1].to(e.opt_tensor.dtype))
            else:
                e.opt_tensor.copy_(local.reshape(e.opt_tensor.shape))
    if scheduler is not None:
        if meta["scheduler"] is None:
            _raise_agreed(f"{path} holds no scheduler state")
        scheduler.load_state_dict(meta["scheduler"])
    if accumulator is not None and meta.get("accumulator") is not None:
        accumulator.load_state_dict(meta["accumulator"])
    if restore_rng:
        rng_file = path / "rng" / f"rank-{rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning(
                "checkpoint %s was saved by %d ranks: rank %d has no saved RNG stream and keeps its own",
                path, meta["world_size"], rank,
            )
    return meta.get("extra")


_KEYS_CACHE: dict[str, set[str]] = {}


def _saved_tensor_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    key = str(path)
    if key not in _KEYS_CACHE:
        _KEYS_CACHE.clear()
        _KEYS_CACHE[key] = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    return _KEYS_CACHE[key]


def _check_groups(meta: dict[str, Any], optimizer: torch.optim.Optimizer, ents: list[Entry]) -> str | None:
    saved = meta["param_groups"]
    here = _param_groups_by_name(optimizer, ents)
    if len(saved) != len(here):
        return (
            f"the checkpoint's optimizer has {len(saved)} param groups, this optimizer "
            f"{len(here)}"
        )
    for i, (a, b) in enumerate(zip(saved, here)):
        if sorted(a["params"]) != sorted(b["params"]):
            only_a = sorted(set(a["params"]) - set(b["params"]))
            only_b = sorted(set(b["params"]) - set(a["params"]))
            return (
                f"param group {i} differs: only in checkpoint: {only_a or '-'}; "
                f"only in this optimizer: {only_b or '-'}"
            )
    return None


def _install_state(optimizer: torch.optim.Optimizer, meta: dict[str, Any], ents: list[Entry], installs: list) -> None:
    by_fqn = {e.fqn: e for e in ents}
    for e in ents:
        optimizer.state.pop(e.opt_tensor, None)
    for e, name, local, _kind in installs:
        optimizer.state.setdefault(e.opt_tensor, {})[name] = local
    for fqn, objs in meta.get("objects", {}).items():
        e = by_fqn.get(fqn)
        if e is None:
            continue
        optimizer.state.setdefault(e.opt_tensor, {}).update(objs)
    # hyperparameters (lr, betas, initial_lr, lookahead counters, ...) by group index
    for g, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                g[k] = v
    # Lookahead keeps its own counters on the wrapper: restore through its hook if any
    post = getattr(optimizer, "_distopt_after_load", None)
    if callable(post):
        post()
