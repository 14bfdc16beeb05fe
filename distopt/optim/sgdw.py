"""SGDW: SGD with decoupled weight decay (Loshchilov & Hutter, 2019), timm's options."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim._cautious import cautious_masks
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import (
    KW_ONLY,
    HyperSpec,
    check_nesterov,
    flag,
    lr,
    nonneg,
    with_max_lr_snapshot,
)

__all__ = ["SGDW"]


class SGDW(DistOptimizer):
    r"""SGD with decoupled weight decay, timm's ``SGDW`` (names ``sgdw`` and ``csgdw``: Nesterov).

    Update rule (element-wise; the cautious mask's mean is over the whole tensor)::

        p <- p * (1 - s * weight_decay)            (s = lr, or lr^2 / max_lr)
        b <- g at the first step, then momentum * b + (1 - dampening) * g
        d  = g + momentum * b if nesterov else b   (d = g without momentum)
        d <- d * cautious mask(d, g)               if caution (with momentum)
        p <- p - lr * d

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        momentum: momentum factor (default 0).
        dampening: dampening of the momentum (default 0).
        weight_decay: decoupled weight decay (default 0).
        nesterov: Nesterov momentum; needs momentum > 0 and dampening 0 (default False).
        caution: the cautious mask (default False).
        corrected_weight_decay: decay by ``lr^2 / max_lr`` (default False).
        maximize: maximize the objective (default False).

    State per parameter (with momentum): ``momentum_buffer``.
    """

    elementwise = True

    hypers = HyperSpec(
        lr(1e-3),
        nonneg("momentum", 0.0),
        nonneg("dampening", 0.0),
        nonneg("weight_decay", 0.0),
        flag("nesterov", False),
        KW_ONLY,
        flag("caution", False),
        flag("corrected_weight_decay", False),
        flag("maximize", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        check_nesterov(hypers)
        return params, with_max_lr_snapshot(hypers)

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        return bool(group["caution"]) and group["momentum"] != 0

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        pass  # the momentum buffer starts as the first gradient (created in _update)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        momentum, wd = group["momentum"], group["weight_decay"]
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if wd != 0.0:
            s = lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
            torch._foreach_mul_(params, 1.0 - s * wd)
        if momentum == 0:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        old = [i for i, v in enumerate(views) if "momentum_buffer" in v.state]
        if old:
            bufs = [views[i].state["momentum_buffer"] for i in old]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1.0 - group["dampening"])
        for i, v in enumerate(views):
            if "momentum_buffer" not in v.state:
                v.state["momentum_buffer"] = (
                    grads[i].detach().clone(memory_format=torch.preserve_format)
                )
        bufs = [v.state["momentum_buffer"] for v in views]
        d = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        if group["caution"]:
            d = torch._foreach_mul(d, cautious_masks(ctx, views, d, grads))
        torch._foreach_add_(params, d, alpha=-lr)
