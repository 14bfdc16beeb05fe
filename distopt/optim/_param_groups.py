"""Param groups for weight-decay filtering and layer-wise lr decay (timm's conventions).

* :func:`param_groups_weight_decay`: biases (names ending in ``.bias``), norm weights and every
  other parameter with ``ndim <= 1``, and the names (``fnmatch`` patterns) in
  ``no_weight_decay_list`` get ``weight_decay=0``.
* :func:`param_groups_layer_decay`: additionally one group per (layer, decay) pair with
  ``lr_scale = layer_decay ** (num_layers - 1 - layer_id)``, the head being the last layer.

Layer ids come from :func:`layer_ids`: the model's ``group_matcher(coarse=False)`` when it has
one (timm models do), otherwise the rule documented there.  These functions only *describe*
the scales; :func:`distopt.optim.create_optimizer_v2` applies them to each group's lr.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Collection
from itertools import chain
from typing import Any

from torch import nn

__all__ = [
    "layer_ids",
    "param_groups_layer_decay",
    "param_groups_weight_decay",
]

_logger = logging.getLogger(__name__)

#: a group_matcher suffix that merges a match into the previous layer (timm's MATCH_PREV_GROUP)
_MATCH_PREV = 99999


def _matches(name: str, patterns: Collection[str]) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in patterns)


def param_groups_weight_decay(
    model: nn.Module,
    weight_decay: float | None = 1e-5,
    weight_decay_exclude_1d: bool = True,
    no_weight_decay_list: Collection[str] = (),
    fallback_list: Collection[str] = (),
    fallback_no_weight_decay: bool = False,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decay and a no-decay group.

    Args:
        model: the model.
        weight_decay: decay of the decay group; 0/None puts everything in the no-decay group.
        weight_decay_exclude_1d: no decay for parameters with ``ndim <= 1`` and ``*.bias``.
        no_weight_decay_list: ``fnmatch`` patterns of names without decay (e.g. the result of
            ``model.no_weight_decay()``).
        fallback_list: name patterns marked ``use_fallback=True`` (for hybrid optimizers; the
            key is ignored by every distopt optimizer).
        fallback_no_weight_decay: add ``no_weight_decay_list`` to ``fallback_list``.

    Returns:
        Non-empty groups in the order no-decay, decay (then the fallback ones).
    """
    if fallback_no_weight_decay:
        fallback_list = set(fallback_list) | set(no_weight_decay_list)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (False, False): [], (True, False): [], (False, True): [], (True, True): []
    }  # (decay, fallback) -> params
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = bool(weight_decay) and not (
            (weight_decay_exclude_1d and (param.ndim <= 1 or name.endswith(".bias")))
            or _matches(name, no_weight_decay_list)
        )
        buckets[(decay, _matches(name, fallback_list))].append(param)
    groups: list[dict[str, Any]] = []
    for decay, fallback in ((False, False), (True, False), (False, True), (True, True)):
        params = buckets[(decay, fallback)]
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if fallback:
            group["use_fallback"] = True
        groups.append(group)
    return groups


# --------------------------------------------------------------------------- layer ids


def _matcher_ids(names: list[str], matcher: dict | Callable) -> dict[str, int]:
    """Layer id of each name from a timm-style ``group_matcher`` (a dict of regexes or a fn)."""
    specs: list[tuple[re.Pattern, tuple, tuple | None]] = []
    if isinstance(matcher, dict):
        for ordinal, spec in enumerate(matcher.values()):
            if spec is None:
                continue
            if isinstance(spec, (list, tuple)):
                specs.extend((re.compile(rx), (ordinal,), suffix) for rx, suffix in spec)
            else:
                specs.append((re.compile(spec), (ordinal,), None))

    def ordinal(name: str) -> tuple[float, ...]:
        if callable(matcher):
            out = matcher(name)
            return tuple(out) if isinstance(out, (list, tuple)) else (out,)
        for rx, prefix, suffix in specs:
            m = rx.match(name)
            if m:
                parts = (prefix, m.groups(), suffix)
                return tuple(float(x) for x in chain.from_iterable(p for p in parts if p))
        return (float("inf"),)  # unmatched (neck, head): the last layer

    keys = {n: ordinal(n) for n in names}
    ids: dict[tuple, int] = {}
    lid = -1
    for key in sorted(set(keys.values())):
        if lid < 0 or key[-1] != _MATCH_PREV:
            lid += 1
        ids[key] = lid
    return {n: ids[k] for n, k in keys.items()}


def _rule_ids(names: list[str]) -> dict[str, int]:
    """Layer ids without a group_matcher (see :func:`layer_ids`)."""

    def block_key(name: str) -> str | None:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                return ".".join(parts[: i + 1])
        return None

    keys = [block_key(n) for n in names]
    if any(k is not None for k in keys):
        blocks: dict[str, int] = {}
        for k in keys:
            if k is not None and k not in blocks:
                blocks[k] = len(blocks) + 1
        first = min(i for i, k in enumerate(keys) if k is not None)
        out = {}
        for i, (n, k) in enumerate(zip(names, keys)):
            if k is not None:
                out[n] = blocks[k]
            else:  # before the first block: stem (0); after it: neck/head (last)
                out[n] = 0 if i < first else len(blocks) + 1
        return out
    tops: dict[str, int] = {}
    for n in names:
        tops.setdefault(n.split(".")[0], len(tops))
    return {n: tops[n.split(".")[0]] for n in names}


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Map each parameter name of ``model`` to a layer id (0 = input side).

    * If the model has ``group_matcher`` (timm models): ``model.group_matcher(coarse=False)``
      is interpreted as timm does — a dict of regexes (or ``(regex, suffix)`` lists) whose match
      groups give numeric ordinals, unmatched names going last, a ``(99999,)`` suffix merging a
      match into the previous layer — or a callable returning the ordinal.
    * Otherwise, if some parameter names contain a numeric path component (``blocks.3.attn...``,
      ``layers.1.conv...``): each distinct prefix up to the first numeric component is one layer,
      in order of appearance, starting at 1; parameters before the first such block (embeddings,
      stem) are layer 0 and parameters after it that are in no block (final norm, head) are the
      last layer.
    * Otherwise each top-level child module is one layer, in order of appearance.
    """
    names = [n for n, _ in model.named_parameters()]
    matcher_fn = getattr(model, "group_matcher", None)
    if callable(matcher_fn):
        return _matcher_ids(names, matcher_fn(coarse=False))
    return _rule_ids(names)


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float = 0.05,
    no_weight_decay_list: Collection[str] = (),
    fallback_list: Collection[str] = (),
    fallback_no_weight_decay: bool = False,
    weight_decay_exclude_1d: bool = True,
    layer_decay: float = 0.75,
    min_scale: float = 0.0,
    no_opt_scale: float | None = None,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Param groups for layer-wise lr decay (BEiT-style) and weight decay.

    Each group carries ``lr_scale = max(min_scale, layer_decay ** (L - 1 - layer_id))`` with
    ``L`` layers from :func:`layer_ids` and ``weight_decay`` (0 for 1-D parameters when
    ``weight_decay_exclude_1d`` and for ``no_weight_decay_list`` matches).  Parameters whose
    scale is below ``no_opt_scale`` are frozen (``requires_grad=False``) and left out.  The
    groups hold no ``lr``: the factory sets it.
    """
    if fallback_no_weight_decay:
        fallback_list = set(fallback_list) | set(no_weight_decay_list)
    ids = layer_ids(model)
    num_layers = max(ids.values(), default=0) + 1
    if num_layers == 1:
        _logger.warning("layer-wise lr decay has no effect: all parameters are in one layer")
    last = num_layers - 1
    scales = [max(min_scale, layer_decay ** (last - i)) for i in range(num_layers)]
    groups: dict[str, dict[str, Any]] = {}
    names: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        fallback = _matches(name, fallback_list)
        no_decay = (weight_decay_exclude_1d and param.ndim <= 1) or _matches(name, no_weight_decay_list)
        lid = ids.get(name, last)
        scale = scales[lid]
        if no_opt_scale and scale < no_opt_scale:
            param.requires_grad_(False)
            continue
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}{'_fallback' if fallback else ''}"
        if key not in groups:
            groups[key] = {"lr_scale": scale, "weight_decay": 0.0 if no_decay else weight_decay, "params": []}
            if fallback:
                groups[key]["use_fallback"] = True
            names[key] = []
        groups[key]["params"].append(param)
        names[key].append(name)
    if verbose:
        for key, group in groups.items():
            _logger.info("%s: lr_scale=%g weight_decay=%g %s", key, group["lr_scale"],
                         group["weight_decay"], names[key])
    return list(groups.values())
