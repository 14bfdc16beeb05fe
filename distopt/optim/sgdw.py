"""SGDW: SGD with decoupled weight decay (Loshchilov & Hutter, 2019), timm's options."""

from __future__ import annotations

from typing import Any

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
from distopt.optim.sgd import sgd_update

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
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

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
        lr, wd = float(group["lr"]), group["weight_decay"]
        s = lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
        sgd_update(
            self, ctx, group, views, decay=1.0 - s * wd, l2=0.0, caution=bool(group["caution"])
        )
