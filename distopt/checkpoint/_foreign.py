"""Export a checkpoint to plain ``torch.save``d state dicts (``distopt ckpt consolidate``).

Import (``load_optimizer_state_dict``) lives in ``_import.py``.  The exported optimizer state dict
records each group's parameter names under ``param_names`` (torch's key for named optimizers), so
it imports back by name into any group layout.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from distopt.checkpoint._common import CheckpointError
from distopt.checkpoint._save_load import read_meta


def _read_all(path: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from distopt.checkpoint._common import describe
    from distopt.checkpoint._reader import ChecksumReader
    from distopt.checkpoint._save_load import _segments, read_marker

    reader = ChecksumReader(path, _segments(read_marker(path)))
    md = reader.read_metadata()
    template: dict[str, Any] = {}
    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            template[key] = torch.empty(m.size, dtype=m.properties.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(template, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch's is a BaseException
        raise CheckpointError(
            f"cannot read the tensors of {path}: {describe(exc)}", corrupt=True
        ) from exc
    return template


def _accumulator(acc: Any, tensors: dict[str, Any]) -> Any:
    if not (isinstance(acc, dict) and acc.get("grads_in") == "dcp"):
        return acc
    out = {k: v for k, v in acc.items() if k != "grads_in"}
    out["grads"] = {
        n: tensors[f"acc/{n}"].reshape(info["shape"]) for n, info in acc["grads"].items()
    }
    return out


def consolidate(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint folder on one process into classic state dicts.

    Returns ``{"model": {fqn: tensor}, "optimizer": <torch-format optimizer state_dict>,
    "scheduler": ..., "accumulator": ..., "extra": ..., "meta": ...}``.  Parameter-shaped state of
    0-dim parameters is given back its 0-dim shape.
    """
    path = Path(path)
    meta = read_meta(path)
    tensors = _read_all(path)
    model = {}
    for fqn in meta["params"]:
        key = f"model/{fqn}"
        if key not in tensors:
            raise CheckpointError(f"{path}: model tensor {fqn} is missing")
        model[fqn] = tensors[key]
    optim = None
    if meta["param_groups"] is not None:
        index: dict[str, int] = {}
        groups = []
        for g in meta["param_groups"]:
            ids = []
            for fqn in g["params"]:
                index.setdefault(fqn, len(index))
                ids.append(index[fqn])
            hp = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            groups.append({**hp, "params": ids, "param_names": list(g["params"])})
        state: dict[int, dict[str, Any]] = {}
        for fqn, names in meta["state_meta"].items():
            if fqn not in index:
                continue
            st = state.setdefault(index[fqn], {})
            zero_dim = len(meta["params"][fqn]) == 0
            for name, info in names.items():
                t = tensors[f"optim/{fqn}/{name}"]
                if zero_dim and info["kind"] == "rows":
                    t = t.reshape(())
                st[name] = t
        for fqn, objs in meta.get("objects", {}).items():
            if fqn in index:
                state.setdefault(index[fqn], {}).update(objs)
        optim = {"state": state, "param_groups": groups}
    return {
        "model": model,
        "optimizer": optim,
        "scheduler": meta.get("scheduler"),
        "accumulator": _accumulator(meta.get("accumulator"), tensors),
        "extra": meta.get("extra"),
        "meta": {
            k: meta[k] for k in ("world_size", "mode", "optimizer_class", "scheduler_class", "step")
        },
    }
