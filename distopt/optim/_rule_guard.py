"""``torch.amp.GradScaler`` for the update forms that do not run through one rule.

An optimizer sets ``_step_supports_amp_scaling = True`` when every update honours the scaler's
``grad_scale`` / ``found_inf`` without a host read (see :mod:`distopt.optim._kernel`).  A few
option sets still take a multi-pass update (AdamP/SGDP/MARS with ``caution=True``: the cautious
mask's mean depends on another whole-tensor statistic, two dependent reductions that one
:func:`~distopt.optim._kernel.apply` cannot express).  :func:`scaled_update` runs such an update
under the same contract: the gradients it sees are divided by ``grad_scale`` (fresh tensors),
the parameter and the named states are put back where ``found_inf`` is set (``torch.where``,
no host read; their values are copied first, which costs memory only in that case), and the
``step`` counter is taken back as :func:`~distopt.optim._kernel.apply` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from distopt.optim import _kernel as K
from distopt.optim._core import ParamView

__all__ = ["scaled_update"]


def scaled_update(
    opt: Any,
    views: Sequence[ParamView],
    states: Sequence[str],
    update: Callable[[list[ParamView]], None],
) -> None:
    """``update(views)`` (in place) under ``opt``'s ``grad_scale`` / ``found_inf``, if set.

    ``states``: the state names ``update`` writes (besides the parameter and ``step``).
    """
    grad_scale, found_inf = K.scaler_of(opt)
    views = list(views)
    if grad_scale is not None:
        invs: dict[torch.device, torch.Tensor] = {}
        scaled = []
        for v in views:
            dev = v.grad.device
            if dev not in invs:
                invs[dev] = grad_scale.to(dev, torch.float32).reciprocal()
            scaled.append(dataclasses.replace(v, grad=v.grad * invs[dev]))
        views = scaled
    if found_inf is None:
        update(views)
        return
    kept = [(t, t.clone()) for v in views for t in (v.data, *(v.state[n] for n in states))]
    update(views)
    for t, old in kept:
        t.copy_(torch.where(found_inf.to(t.device) > 0, old, t))
    for v in views:
        step = v.state.get("step")
        if isinstance(step, torch.Tensor):
            step.sub_(found_inf.to(step.device, step.dtype))
