"""Import and export plain ``torch.save``d optimizer state dicts.

Import: the ``optimizer.state_dict()`` of torch.optim, timm or transformers (e.g. the
``optimizer.pt`` of a HF Trainer checkpoint) into a distopt optimizer in any mode — each rank
keeps only its rows.  Export: read a distopt checkpoint folder on one process and write the
classic format back (``distopt ckpt consolidate``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distopt.checkpoint._common import CheckpointError
from distopt.checkpoint._layout import entries, local_of
from distopt.checkpoint._save_load import read_meta


def _row_slice(value: Tensor, rows: tuple[int, int] | None, zero_dim_param: bool) -> Tensor:
    if zero_dim_param and value.dim() == 0:
        value = value.reshape(1)
    if rows is None:
        return value.clone()
    s, e = rows
    return value[s:e].clone()


def load_optimizer_state_dict(
    optimizer: torch.optim.Optimizer,
    state_dict: dict[str, Any],
    *,
    model: nn.Module | None = None,
) -> None:
    """Load a classic optimizer ``state_dict`` (integer-indexed) into ``optimizer``.

    Parameters are matched by position, as ``torch.optim.Optimizer.load_state_dict`` does: the
    optimizer must have the same param groups, with the same numbers of parameters in the same
    order, as the one that produced ``state_dict``.  Under distopt ZeRO pass the sharded
    ``model`` (each rank then keeps its rows of every parameter-shaped state tensor); under
    FSDP2 the DTensor parameters tell the layout themselves.  Group hyperparameters present in
    both (lr, betas, weight_decay, initial_lr, ...) are taken from ``state_dict``.
    """
    if (
        not isinstance(state_dict, dict)
        or "state" not in state_dict
        or "param_groups" not in state_dict
    ):
        raise ValueError("expected an optimizer state_dict with 'state' and 'param_groups' keys")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the state_dict has {len(saved_groups)} param groups, the optimizer {len(optimizer.param_groups)}"
        )
    for i, (a, b) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if len(a["params"]) != len(b["params"]):
            raise ValueError(
                f"param group {i}: the state_dict has {len(a['params'])} parameters, the optimizer {len(b['params'])}"
            )
    layout = {}
    if model is not None:
        layout = {id(e.opt_tensor): e for e in entries(model, optimizer)}
    classify = getattr(optimizer, "state_is_sharded", None)
    for saved, group in zip(saved_groups, optimizer.param_groups):
        for idx, p in zip(saved["params"], group["params"]):
            optimizer.state.pop(p, None)
            src = state_dict["state"].get(idx)
            if not src:
                continue
            e = layout.get(id(p))
            if e is not None:
                full_shape, rows = e.shape, (e.bounds[e.rank] if e.bounds is not None else None)
            elif type(p).__name__ == "DTensor":
                from distopt.checkpoint._layout import _chunk_bounds
                from distopt.optim._core import _dtensor_local_and_sharding

                _, sharded, pg = _dtensor_local_and_sharding(p)
                import torch.distributed as dist

                full_shape = p.shape
                rows = (
                    _chunk_bounds(p.shape[0], dist.get_world_size(pg))[dist.get_rank(pg)]
                    if sharded
                    else None
                )
            else:
                spec = getattr(optimizer, "shard_spec", lambda _p: None)(p)
                if spec is not None:
                    raise ValueError(
                        "this optimizer is sharded by distopt.shard: pass model=<the sharded model>"
                    )
                full_shape, rows = p.shape, None
            dev = local_of(None, p).device if type(p).__name__ == "DTensor" else p.device
            st: dict[str, Any] = {}
            for name, v in src.items():
                if (
                    name == "step"
                    and not isinstance(v, Tensor)
                    and hasattr(optimizer, "_init_state")
                ):
                    v = torch.tensor(float(v), dtype=torch.float32)
                if not isinstance(v, Tensor):
                    st[name] = v
                    continue
                zero_dim = len(full_shape) == 0
                param_like = (
                    v.dim() >= 1
                    and (
                        classify(name, v, full_shape)
                        if classify
                        else tuple(v.shape) == tuple(full_shape)
                    )
                ) or (zero_dim and v.dim() == 0 and name != "step")
                if param_like:
                    v = _row_slice(v, rows, zero_dim)
                    st[name] = v.to(dev)
                else:
                    st[name] = v.clone() if name == "step" else v.clone().to(dev)
            optimizer.state[p] = st
        for k, v in saved.items():
            if k != "params" and k in group:
                group[k] = v
            elif k == "initial_lr":
                group[k] = v


def _read_all(path: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(path)).read_metadata()
    template: dict[str, Any] = {}
    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            template[key] = torch.empty(m.size, dtype=m.properties.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=str(path), no_dist=True)
    return template


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
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
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
        "accumulator": meta.get("accumulator"),
        "extra": meta.get("extra"),
        "meta": {
            k: meta[k] for k in ("world_size", "mode", "optimizer_class", "scheduler_class", "step")
        },
    }
