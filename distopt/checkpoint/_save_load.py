"""The checkpoint format, and ``load``: collective, reshardable, every phase agreed across ranks.

On disk, a checkpoint is a folder::

    .metadata, __<rank>_<n>.distcp    DCP: model tensors, optimizer state tensors, ZeRO master rows,
                                      a mid-window accumulator's gradient sum; logical keys
    distopt_meta.pt                   param groups (by parameter name), scheduler, accumulator
                                      position, non-tensor optimizer state, user ``extra``, how it
                                      was saved
    rng/rank-<r>.pt                   each rank's RNG streams
    COMMITTED                         JSON commit marker: written last, lists every file with its
                                      size and CRC32 segments (format 1: one CRC32 per file) and
                                      the items holding a contiguous tensor (``rowmajor``: read
                                      directly into their targets on load, ``_direct.py``)

Keys are logical: ``model/<fqn>``, ``optim/<fqn>/<state name>``, ``master/<fqn>``,
``acc/<fqn>``.  Row-sharded tensors (ZeRO, FSDP2) are written by their owners in parallel as DCP
shards of the global tensor; replicated ones are written once.  Any layout can read any other:
DCP computes which saved chunks overlap the rows a rank needs.  ``save`` lives in ``_save.py``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distopt._dtensor import is_dtensor
from distopt.checkpoint._common import (
    CheckpointError,
    describe,
    dist_on,
    failure_message,
    gc_paused,
)
from distopt.checkpoint._common import (
    rank as _rank,
)
from distopt.checkpoint._common import (
    world as _world,
)
from distopt.checkpoint._layout import Entry, entries, local_of, row_sharded

log = logging.getLogger("distopt.checkpoint")

MARKER = "COMMITTED"
META = "distopt_meta.pt"
FORMAT_VERSION = 2  # 1: whole-file CRC32 in the marker; 2: CRC32 segments, accumulator in DCP


# --------------------------------------------------------------------------- sharded tensors


def has_master(e: Entry) -> bool:
    return e.bounds is not None and e.opt_tensor.dtype != e.param.dtype


def master_shape(e: Entry) -> tuple[int, ...]:
    return (e.rows, *e.shape[1:])


def param_groups_by_name(optimizer: Any, ents: list[Entry]) -> list[dict[str, Any]]:
    name_of = {id(e.opt_tensor): e.fqn for e in ents}
    groups = []
    for g in optimizer.param_groups:
        d = {k: v for k, v in g.items() if k != "params"}
        d["params"] = [name_of.get(id(p), f"<unnamed:{i}>") for i, p in enumerate(g["params"])]
        groups.append(d)
    return groups


def _local_rows(e: Entry) -> tuple[int, int]:
    if e.bounds is None:
        return 0, e.rows
    return e.bounds[e.rank]


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
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


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed commit marker of ``path``; :class:`CheckpointError` if missing or unreadable."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_bytes().decode("utf-8"))
        files = marker["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not a mapping")
        for name, info in files.items():
            if isinstance(info, list):  # format 1: [size, crc32 of the whole file]
                size, _crc = info
            else:
                size = info["size"]
                for seg in info["segments"]:
                    if len(seg) != 3:
                        raise ValueError(f"bad segment for {name}")
            if not isinstance(size, int):
                raise ValueError(f"bad size for {name}")
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (no {MARKER} marker: the save was interrupted)",
            corrupt=True,
        ) from exc
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"cannot read commit marker {path / MARKER}: {describe(exc)}", corrupt=True
        ) from exc
    return marker


def _file_info(marker: dict[str, Any], name: str) -> tuple[int, list[list[int]] | None, int | None]:
    """(size, CRC segments or None, whole-file CRC or None) of one file in the marker."""
    info = marker["files"][name]
    if isinstance(info, list):
        return info[0], None, info[1]
    return info["size"], info["segments"], None


def _read_checked(path: Path, name: str, marker: dict[str, Any]) -> bytes:
    """A small file of the checkpoint, checked against the marker (size and CRC32)."""
    f = path / name
    if name not in marker["files"]:
        raise CheckpointError(f"checkpoint file {f} is not listed in {path / MARKER}", corrupt=True)
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"cannot read checkpoint file {f}: {describe(exc)}", corrupt=True
        ) from exc
    size, segs, crc = _file_info(marker, name)
    if len(data) != size:
        raise CheckpointError(
            f"checkpoint file {f} is truncated or changed: {len(data)} bytes, expected {size}",
            corrupt=True,
        )
    whole = zlib.crc32(data)
    if (crc is not None and whole != crc) or (
        segs and any(zlib.crc32(data[o : o + n]) != c for o, n, c in segs)
    ):
        raise CheckpointError(f"checkpoint file {f} is corrupted (CRC32 mismatch)", corrupt=True)
    return data


def _torch_load_bytes(data: bytes, where: Path) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - report which file is bad
        raise CheckpointError(f"cannot read {where}: {describe(exc)}", corrupt=True) from exc


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a committed checkpoint (no distributed set-up needed)."""
    path = resolve(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    return _meta_from(path, read_marker(path))


def _meta_from(path: Path, marker: dict[str, Any]) -> dict[str, Any]:
    if META in marker["files"]:
        data = _read_checked(path, META, marker)
    else:
        try:
            data = (path / META).read_bytes()
        except OSError as exc:
            raise CheckpointError(
                f"cannot read {path / META}: {describe(exc)}", corrupt=True
            ) from exc
    meta = _torch_load_bytes(data, path / META)
    if not isinstance(meta, dict) or "params" not in meta:
        raise CheckpointError(
            f"cannot read {path / META}: not a distopt checkpoint metadata file", corrupt=True
        )
    return meta


def _check_sizes(path: Path, marker: dict[str, Any], names: list[str]) -> None:
    for name in names:
        f = path / name
        size = _file_info(marker, name)[0]
        try:
            got = f.stat().st_size
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint file {f} is missing", corrupt=True) from exc
        if got != size:
            raise CheckpointError(
                f"checkpoint file {f} is truncated or changed: {got} bytes, expected {size}",
                corrupt=True,
            )


def verify(path: str | os.PathLike, files: list[str] | None = None) -> None:
    """Full check of the checkpoint's files against its commit marker: sizes and CRC32 of
    every byte (reads every file; :func:`load` checks what it reads on the way instead)."""
    from distopt.checkpoint._reader import file_segments_ok

    path = Path(path)
    marker = read_marker(path)
    names = [n for n in marker["files"] if files is None or n in files]
    _check_sizes(path, marker, names)
    for name in names:
        f = path / name
        size, segs, crc = _file_info(marker, name)
        if segs is not None:
            bad = file_segments_ok(f, segs)
        else:
            with open(f, "rb") as fh:
                bad = None if zlib.crc32(fh.read()) == crc else "CRC32 mismatch"
        if bad:
            raise CheckpointError(
                f"checkpoint file {f} is corrupted (CRC32 mismatch)", corrupt=True
            )


def _check_model_fits(meta: dict[str, Any], ents: list[Entry]) -> str | None:
    saved = {k: tuple(v) for k, v in meta["params"].items()}
    here = {e.fqn: tuple(e.shape) for e in ents}
    missing = sorted(set(here) - set(saved))
    unexpected = sorted(set(saved) - set(here))
    mismatched = sorted(
        f"{k}: checkpoint {saved[k]} vs model {here[k]}"
        for k in set(saved) & set(here)
        if saved[k] != here[k]
    )
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


def _template_rows(
    e: Entry, gshape: tuple[int, ...], dtype: torch.dtype, device: torch.device, reuse: Any = None
) -> tuple[Any, Tensor]:
    s, t = _local_rows(e)
    shape = (t - s, *gshape[1:])
    local = (
        reuse
        if _reusable(reuse, shape, dtype, device)
        else torch.zeros(shape, dtype=dtype, device=device)
    )
    if e.bounds is None:
        return local, local
    return row_sharded(local, gshape, e.bounds, e.rank, e.group), local


def _reusable(t: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Load into the optimizer's existing state tensor (as plain DCP does) when it fits."""
    return (
        isinstance(t, Tensor)
        and not is_dtensor(t)
        and tuple(t.shape) == tuple(shape)
        and t.dtype == dtype
        and t.device == device
        and t.is_contiguous()
    )


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
    reads just the rows it holds.  With ``verify_files`` (default) every file's size is checked
    against the commit marker first, and the CRC32 of every byte read is checked on the bytes
    as they are read (no separate pass over the files; :func:`verify` checks every byte of
    every file).

    Raises :class:`CheckpointError` on every rank alike — for an incomplete, truncated or
    corrupted checkpoint (naming the file; ``exc.corrupt`` is True), or one that does not fit the
    model (listing missing, unexpected and shape-mismatched parameter names).  Errors found
    before the tensors are read leave the model and optimizer untouched; after a failure while
    reading the tensors they hold a mix of old and loaded values.
    """
    with gc_paused():
        return _load(path, model, optimizer, scheduler, accumulator, strict, verify_files,
                     restore_rng)  # fmt: skip


def _load(path: str | os.PathLike, model: nn.Module, optimizer: Any, scheduler: Any,
          accumulator: Any, strict: bool, verify_files: bool, restore_rng: bool) -> Any:  # fmt: skip
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException

    from distopt.checkpoint._async import wait_snapshot
    from distopt.checkpoint._reader import ChecksumReader

    wait_snapshot()  # an asynchronous save in flight copies the tensors this load overwrites
    path = resolve(path)
    rank, world = _rank(), _world()
    pre: tuple[str, bool] | None = None
    meta: dict[str, Any] = {}
    template: dict[str, Any] = {}
    installs: list[tuple[Entry, str, Tensor, str]] = []
    masters: list[tuple[Entry, Tensor | None]] = []
    acc_grads: dict[str, Tensor] = {}
    rng: list[Any] = []
    reader = None
    # Everything that can be checked before the tensors (marker, metadata, sizes, fit, RNG
    # file), on every rank; an error is raised inside DCP's planning step (no extra collective)
    try:
        marker = read_marker(path)
        meta = _meta_from(path, marker)
        if verify_files:
            _check_sizes(path, marker, sorted(marker["files"])[rank::world])
        ents = entries(model, optimizer)
        err = _check_model_fits(meta, ents) if strict else None
        if err is None and optimizer is not None:
            err = (
                f"{path} holds no optimizer state (saved with optimizer=None)"
                if meta["param_groups"] is None
                else _check_groups(meta, optimizer, ents)
            )
        if err is None and scheduler is not None and meta.get("scheduler") is None:
            err = f"{path} holds no scheduler state"
        if err is not None:
            raise CheckpointError(err)
        if restore_rng:
            rng.append(_read_rng(path, marker, meta, rank))
        reader = ChecksumReader(
            path,
            _segments(marker) if verify_files else None,
            metadata_entry=marker["files"].get(".metadata") if verify_files else None,
            row_major=_row_major(marker),
        )
        saved_keys = set(reader.read_metadata().state_dict_metadata)
        _build_template(meta, ents, optimizer, saved_keys, template, installs, masters)
        acc_meta = meta.get("accumulator")
        if (
            accumulator is not None
            and isinstance(acc_meta, dict)
            and acc_meta.get("grads_in") == "dcp"
        ):
            for name, info in acc_meta["grads"].items():
                shape = tuple(info["shape"]) or (1,)
                acc_grads[name] = torch.zeros(shape, dtype=getattr(torch, info["dtype"]))
                template[f"acc/{name}"] = acc_grads[name]
    except CheckpointError as exc:
        pre = (str(exc), exc.corrupt)
    except Exception as exc:  # noqa: BLE001 - raised on every rank inside DCP's planning
        pre = (describe(exc, path), getattr(exc, "corrupt", True))
    if pre is not None:
        reader, template = ChecksumReader(path, None, pre_error=pre), {}

    def install() -> None:  # once this rank's tensors are in place (inside DCP's read step)
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
            scheduler.load_state_dict(meta["scheduler"])
        acc_meta = meta.get("accumulator")
        if accumulator is not None and acc_meta is not None:
            sd = dict(acc_meta)
            if sd.pop("grads_in", None) == "dcp":
                sd["grads"] = {
                    n: g.reshape(acc_meta["grads"][n]["shape"]) for n, g in acc_grads.items()
                }
            accumulator.load_state_dict(sd)
        if rng and rng[0] is not None:
            _set_rng_state(rng[0])

    reader.after = install
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            dcp.load(template, storage_reader=reader, no_dist=not dist_on())
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch's is a BaseException
        msg, corrupt = failure_message(exc)
        raise CheckpointError(f"cannot load checkpoint {path}: {msg}", corrupt=corrupt) from None
    return meta.get("extra")


def _read_rng(path: Path, marker: dict[str, Any], meta: dict[str, Any], rank: int) -> Any:
    """This rank's saved RNG streams (None, with a warning, when the save had fewer ranks)."""
    name = f"rng/rank-{rank}.pt"
    if not (path / name).is_file():
        log.warning(
            "checkpoint %s was saved by %d ranks: rank %d has no saved RNG stream and keeps its own",
            path,
            meta["world_size"],
            rank,
        )
        return None
    try:
        data = (
            _read_checked(path, name, marker)
            if name in marker["files"]
            else (path / name).read_bytes()
        )
    except OSError as exc:
        raise CheckpointError(f"cannot read {path / name}: {describe(exc)}", corrupt=True) from exc
    return _torch_load_bytes(data, path / name)


def _segments(marker: dict[str, Any]) -> dict[str, list[list[int]]]:
    return {n: info["segments"] for n, info in marker["files"].items() if isinstance(info, dict)}


def _row_major(marker: dict[str, Any]) -> dict[str, set[int]]:
    """Per file, the offsets of the items a load may read directly (see ``_direct.py``)."""
    return {
        n: set(i.get("rowmajor", ())) for n, i in marker["files"].items() if isinstance(i, dict)
    }


def _build_template(
    meta: dict[str, Any],
    ents: list[Entry],
    optimizer: Any,
    saved_keys: set[str],
    template: dict[str, Any],
    installs: list,
    masters: list,
) -> None:
    for e in ents:
        if e.fqn not in meta["params"]:
            continue
        p = e.param
        template[f"model/{e.fqn}"] = p.detach() if not is_dtensor(p) else p
        if optimizer is None:
            continue
        dev = local_of(e, e.opt_tensor).device
        for name, info in meta["state_meta"].get(e.fqn, {}).items():
            dtype = getattr(torch, info["dtype"])
            gshape = tuple(info["shape"])
            reuse = optimizer.state.get(e.opt_tensor, {}).get(name)
            if info["kind"] == "rows":
                if gshape[0] != e.rows:
                    raise CheckpointError(
                        f"state {e.fqn}/{name} has {gshape[0]} rows, the parameter {e.rows}"
                    )
                tpl, local = _template_rows(e, gshape, dtype, dev, reuse)
            else:
                ok = _reusable(reuse, gshape, dtype, dev)
                local = reuse if ok else torch.zeros(gshape, dtype=dtype, device=dev)
                tpl = local
            template[f"optim/{e.fqn}/{name}"] = tpl
            installs.append((e, name, local, info["kind"]))
        if has_master(e):
            if f"master/{e.fqn}" in saved_keys:
                tpl, local = _template_rows(
                    e, master_shape(e), e.opt_tensor.dtype, e.opt_tensor.device
                )
                template[f"master/{e.fqn}"] = tpl
                masters.append((e, local))
            else:
                masters.append((e, None))


def _check_groups(
    meta: dict[str, Any], optimizer: torch.optim.Optimizer, ents: list[Entry]
) -> str | None:
    saved = meta["param_groups"]
    here = param_groups_by_name(optimizer, ents)
    if len(saved) != len(here):
        return (
            f"the checkpoint's optimizer has {len(saved)} param groups, this optimizer {len(here)}"
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


def _install_state(
    optimizer: torch.optim.Optimizer, meta: dict[str, Any], ents: list[Entry], installs: list
) -> None:
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
