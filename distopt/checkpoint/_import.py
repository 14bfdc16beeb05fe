"""Import a classic ``torch.save``d optimizer state dict (torch.optim, timm, transformers, a HF
Trainer ``optimizer.pt``, ``distopt ckpt consolidate`` output) into a distopt run, by parameter
name where names are known.

Matching, in order of preference:

1. **by name** — when the source names its parameters (``param_names`` in its groups, as torch's
   named optimizers and ``distopt ckpt consolidate`` write; the ``param_names=`` argument; or a HF
   Trainer checkpoint folder, whose model file lists the names) and the target's names are known
   (``model=``, or names in the optimizer's groups).  Group layouts may differ: a one-group
   ``torch.optim.AdamW`` imports into a two-group distopt optimizer.  Each target group takes
   the hyperparameters its parameters had in the source when they all came from source groups
   that agree; otherwise it keeps its own (and says so in the log).
2. **by position** — only when the group structure agrees (same number of groups, same number of
   parameters in each, parameter-shaped state matching the parameters' shapes).
3. otherwise a ``ValueError`` with both structures side by side.

timm keeps some step counters in the param group (``Lamb``: ``group['step']``); a distopt
optimizer keeps them per parameter: the group's ``step`` becomes each parameter's ``step``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distopt._dtensor import is_dtensor, local_and_sharding
from distopt.checkpoint._layout import _chunk_bounds, entries, local_of, unwrap

log = logging.getLogger("distopt.checkpoint")

# Trainer.get_decay_parameter_names (transformers): no weight decay for parameters inside
# nn.LayerNorm modules or whose name matches one of these (lower-cased).
_HF_NO_DECAY = [
    re.compile(p)
    for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
]
_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


def trainer_param_names(checkpoint_dir: str | os.PathLike, model: nn.Module) -> list[list[str]]:
    """The parameter names of a HF Trainer checkpoint's ``optimizer.pt``, group by group.

    ``transformers.Trainer`` builds two groups from ``model.named_parameters()`` (trainable
    ones): those with weight decay, then those without (biases, norm weights, anything inside an
    ``nn.LayerNorm``).  The names come from the model file saved beside ``optimizer.pt``
    (``model.safetensors`` or ``pytorch_model.bin``), in ``model``'s order; ``model`` is the same
    architecture as the checkpoint's (plain, or wrapped by DDP / ``distopt.shard``).
    """
    folder = Path(checkpoint_dir)
    saved = _model_file_names(folder)
    inner = unwrap(model)
    in_layernorm = set()
    for mname, mod in inner.named_modules():
        if isinstance(mod, nn.LayerNorm):
            in_layernorm.update(f"{mname}.{n}" if mname else n for n, _ in mod.named_parameters())
    names = [n for n, p in inner.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(
            f"{folder}: the model file does not have {len(missing)} of this model's parameters "
            f"({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}): not a checkpoint of this model"
        )
    decay = [
        n
        for n in names
        if n not in in_layernorm and not any(p.search(n.lower()) for p in _HF_NO_DECAY)
    ]
    no_decay = [n for n in names if n not in set(decay)]
    return [decay, no_decay]


def _model_file_names(folder: Path) -> set[str]:
    for fname in _MODEL_FILES:
        f = folder / fname
        if not f.is_file():
            continue
        if fname.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                return set(sf.keys())
        return set(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    raise ValueError(
        f"{folder} has no {' or '.join(_MODEL_FILES)} to take the parameter names from"
    )


def _structure(groups: list[list[Any]], shapes: list[list[Any]]) -> list[str]:
    out = []
    for i, (names, shp) in enumerate(zip(groups, shapes)):
        items = [f"{n}{list(s) if s is not None else ''}" for n, s in zip(names, shp)]
        shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
        out.append(f"group {i}: {len(items)} params: {shown}")
    return out


def _side_by_side(why: str, src: list[str], tgt: list[str]) -> str:
    w = max([len(s) for s in src] + [len("state_dict")])
    lines = [why, f"  {'state_dict':{w}s} | this optimizer"]
    for i in range(max(len(src), len(tgt))):
        a = src[i] if i < len(src) else ""
        b = tgt[i] if i < len(tgt) else ""
        lines.append(f"  {a:{w}s} | {b}")
    lines.append(
        "  (pass param_names= with the source's parameter names, or model= so the names of this "
        "optimizer's parameters are known, to match by name)"
    )
    return "\n".join(lines)


def _source_names(state_dict: dict[str, Any], param_names: Any) -> dict[int, str] | None:
    groups = state_dict["param_groups"]
    if param_names is None:
        if not all("param_names" in g for g in groups):
            return None
        param_names = [list(g["param_names"]) for g in groups]
    if isinstance(param_names, dict):
        return {int(k): str(v) for k, v in param_names.items()}
    param_names = list(param_names)
    if param_names and all(isinstance(x, (list, tuple)) for x in param_names):  # group by group
        if [len(x) for x in param_names] != [len(g["params"]) for g in groups]:
            raise ValueError(
                f"param_names has groups of {[len(x) for x in param_names]} names, the state_dict "
                f"groups of {[len(g['params']) for g in groups]} parameters"
            )
        flat = [n for x in param_names for n in x]
    else:
        flat = [str(n) for n in param_names]
    idx = [i for g in groups for i in g["params"]]
    if len(flat) != len(idx):
        raise ValueError(f"param_names has {len(flat)} names, the state_dict {len(idx)} parameters")
    return dict(zip(idx, flat))


def _target_names(
    optimizer: torch.optim.Optimizer, model: nn.Module | None
) -> dict[int, str] | None:
    if model is not None:
        return {id(e.opt_tensor): e.fqn for e in entries(model, optimizer)}
    if all("param_names" in g for g in optimizer.param_groups):
        return {
            id(p): n for g in optimizer.param_groups for p, n in zip(g["params"], g["param_names"])
        }
    return None


def _param_shaped(v: Any, shape: tuple[int, ...]) -> bool:
    return isinstance(v, Tensor) and v.dim() >= 1 and tuple(v.shape) == tuple(shape)


def _match(
    optimizer: torch.optim.Optimizer,
    state_dict: dict[str, Any],
    model: nn.Module | None,
    param_names: Any,
) -> tuple[dict[int, int], str]:
    """id(target param) -> source index, and how they were matched."""
    src_groups = state_dict["param_groups"]
    src_names = _source_names(state_dict, param_names)
    tgt_names = _target_names(optimizer, model)
    tgt_params = [p for g in optimizer.param_groups for p in g["params"]]
    if src_names is not None and tgt_names is not None:
        by_name = {n: i for i, n in src_names.items()}
        out, missing = {}, []
        for p in tgt_params:
            n = tgt_names.get(id(p))
            if n is None or n not in by_name:
                missing.append(n or "<unnamed>")
            else:
                out[id(p)] = by_name[n]
        extra = sorted(set(by_name) - {tgt_names.get(id(p)) for p in tgt_params})
        if missing or extra:
            raise ValueError(
                "the state_dict's parameters and this optimizer's differ by name:\n"
                f"  only in this optimizer ({len(missing)}): {', '.join(missing) or '-'}\n"
                f"  only in the state_dict ({len(extra)}): {', '.join(extra) or '-'}"
            )
        return out, "name"
    # position: only when the structure agrees
    shapes_of = _full_shapes(optimizer, model)
    src_struct = [
        [src_names.get(i, f"#{i}") if src_names else f"#{i}" for i in g["params"]]
        for g in src_groups
    ]
    src_shapes = [
        [_state_shape(state_dict["state"].get(i)) for i in g["params"]] for g in src_groups
    ]
    tgt_struct = [
        [(tgt_names or {}).get(id(p), f"#{k}") for k, p in enumerate(g["params"])]
        for g in optimizer.param_groups
    ]
    tgt_shapes = [[tuple(shapes_of[id(p)]) for p in g["params"]] for g in optimizer.param_groups]
    agree = len(src_groups) == len(optimizer.param_groups) and all(
        len(a["params"]) == len(b["params"]) for a, b in zip(src_groups, optimizer.param_groups)
    )
    if agree:
        for sg, tg in zip(src_shapes, tgt_shapes):
            agree = agree and all(s is None or s == t for s, t in zip(sg, tg))
    if not agree:
        raise ValueError(
            _side_by_side(
                "cannot match the state_dict's parameters to this optimizer's by position: the group "
                "structures differ, and names are not known on both sides",
                _structure(src_struct, src_shapes),
                _structure(tgt_struct, tgt_shapes),
            )
        )
    return {
        id(p): i
        for a, b in zip(src_groups, optimizer.param_groups)
        for i, p in zip(a["params"], b["params"])
    }, "position"


def _state_shape(st: Any) -> tuple[int, ...] | None:
    """The shape of the first parameter-shaped (non-scalar) tensor in a state, if any."""
    if not isinstance(st, dict):
        return None
    for k, v in st.items():
        if (
            isinstance(v, Tensor)
            and v.dim() >= 1
            and k in ("exp_avg", "momentum_buffer", "exp_avg_sq", "square_avg")
        ):
            return tuple(v.shape)
    return None


def _full_shapes(
    optimizer: torch.optim.Optimizer, model: nn.Module | None
) -> dict[int, torch.Size]:
    out = {id(p): p.shape for g in optimizer.param_groups for p in g["params"]}
    if model is not None:
        out.update({id(e.opt_tensor): e.shape for e in entries(model, optimizer)})
    return out


def load_optimizer_state_dict(
    optimizer: torch.optim.Optimizer,
    state_dict: dict[str, Any] | str | os.PathLike,
    *,
    model: nn.Module | None = None,
    param_names: Any = None,
) -> None:
    """Load a classic optimizer ``state_dict`` (integer-indexed) into ``optimizer``.

    Args:
        optimizer: the distopt (or torch) optimizer to load into, in any mode.
        state_dict: the source ``optimizer.state_dict()``, or the path of a ``torch.save``d one.
            The path of a HF Trainer checkpoint's ``optimizer.pt`` takes the parameter names
            from the model file beside it (see :func:`trainer_param_names`; needs ``model``).
        model: the model as trained (plain, DDP, ``distopt.shard``'s, FSDP2): names this
            optimizer's parameters and, under ZeRO, tells each rank its rows (pass it there).
        param_names: the source's parameter names in its order — a flat list (``[n for n, _ in
            model.named_parameters()]`` for an optimizer built on ``model.parameters()``), one
            list per group, or ``{index: name}``.  Default: the ``param_names`` stored in the
            state dict's groups, if any.

    Parameters are matched by name when both sides are named, else by position when the group
    structure agrees, else a ``ValueError`` shows both structures (see the module docs).  Each
    rank keeps only its rows of parameter-shaped state.  Group hyperparameters (lr, betas,
    weight_decay, initial_lr, ...) come from the source.
    """
    names_from_trainer = None
    if isinstance(state_dict, (str, os.PathLike)):
        src_path = Path(state_dict)
        state_dict = torch.load(src_path, map_location="cpu", weights_only=False)
        if (
            param_names is None
            and model is not None
            and any((src_path.parent / f).is_file() for f in _MODEL_FILES)
        ):
            if not (
                isinstance(state_dict, dict)
                and all("param_names" in g for g in state_dict.get("param_groups", []))
            ):
                names_from_trainer = trainer_param_names(src_path.parent, model)
    if (
        not isinstance(state_dict, dict)
        or "state" not in state_dict
        or "param_groups" not in state_dict
    ):
        raise ValueError("expected an optimizer state_dict with 'state' and 'param_groups' keys")
    if names_from_trainer is not None:
        sizes = [len(g["params"]) for g in state_dict["param_groups"]]
        got = [len(x) for x in names_from_trainer]
        if sizes != got:
            raise ValueError(
                _side_by_side(
                    "this optimizer.pt does not have the HF Trainer's groups for this model",
                    [f"group {i}: {n} params" for i, n in enumerate(sizes)],
                    [f"Trainer group {i}: {n} params" for i, n in enumerate(got)],
                )
            )
        param_names = names_from_trainer
    src_groups = state_dict["param_groups"]
    match, how = _match(optimizer, state_dict, model, param_names)
    group_of = {i: gi for gi, g in enumerate(src_groups) for i in g["params"]}
    log.info("importing optimizer state: parameters matched by %s", how)
    layout = {id(e.opt_tensor): e for e in entries(model, optimizer)} if model is not None else {}
    for group in optimizer.param_groups:
        sources = sorted({group_of[match[id(p)]] for p in group["params"]})
        for p in group["params"]:
            idx = match[id(p)]
            optimizer.state.pop(p, None)
            src = state_dict["state"].get(idx)
            if not src:
                continue
            st = _convert(optimizer, p, dict(src), layout.get(id(p)))
            group_step = src_groups[group_of[idx]].get("step")
            if (
                "step" not in st and group_step is not None and "step" not in group
            ):  # timm: step per group
                st["step"] = _step_value(optimizer, group_step)
            optimizer.state[p] = st
        _take_hyperparameters(group, [src_groups[i] for i in sources])


def _step_value(optimizer: Any, v: Any) -> Any:
    if hasattr(optimizer, "_init_state"):  # distopt: a float32 scalar tensor on the CPU
        return torch.tensor(float(v), dtype=torch.float32)
    return v.clone() if isinstance(v, Tensor) else v


def _take_hyperparameters(group: dict[str, Any], sources: list[dict[str, Any]]) -> None:
    if not sources:
        return
    keys = {k for s in sources for k in s} - {"params", "param_names"}
    for k in sorted(keys):
        if k not in group and k != "initial_lr":
            continue
        vals = [s[k] for s in sources if k in s]
        if len(vals) != len(sources) or any(_differs(v, vals[0]) for v in vals[1:]):
            log.warning(
                "param group %s: the source groups disagree on %r (%s); keeping %r",
                len(group["params"]),
                k,
                vals,
                group.get(k),
            )
            continue
        group[k] = vals[0].clone() if isinstance(vals[0], Tensor) else vals[0]


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return not torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a != b


def _convert(optimizer: Any, p: Tensor, src: dict[str, Any], e: Any) -> dict[str, Any]:
    """One parameter's state: this rank's rows of parameter-shaped tensors, on p's device."""
    if e is not None:
        full_shape, rows = e.shape, (e.bounds[e.rank] if e.bounds is not None else None)
    elif is_dtensor(p):
        import torch.distributed as dist

        _, sharded, pg = local_and_sharding(p)
        full_shape = p.shape
        rows = (
            _chunk_bounds(p.shape[0], dist.get_world_size(pg))[dist.get_rank(pg)]
            if sharded
            else None
        )
    else:
        if getattr(optimizer, "shard_spec", lambda _p: None)(p) is not None:
            raise ValueError(
                "this optimizer is sharded by distopt.shard: pass model=<the sharded model>"
            )
        full_shape, rows = p.shape, None
    dev = local_of(None, p).device if is_dtensor(p) else p.device
    classify = getattr(optimizer, "state_is_sharded", None)
    zero_dim = len(full_shape) == 0
    st: dict[str, Any] = {}
    for name, v in src.items():
        if name == "step" and not isinstance(v, Tensor) and hasattr(optimizer, "_init_state"):
            v = torch.tensor(float(v), dtype=torch.float32)
        if not isinstance(v, Tensor):
            st[name] = v
            continue
        param_like = (
            v.dim() >= 1
            and (classify(name, v, full_shape) if classify else tuple(v.shape) == tuple(full_shape))
        ) or (zero_dim and v.dim() == 0 and name != "step")
        if param_like:
            if zero_dim and v.dim() == 0:
                v = v.reshape(1)
            v = v.clone() if rows is None else v[rows[0] : rows[1]].clone()
            st[name] = v.to(dev)
        else:
            st[name] = v.clone() if name == "step" else v.clone().to(dev)
    return st
