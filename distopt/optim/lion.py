"""Lion: evolved sign momentum (Chen et al., 2023, "Symbolic Discovery of Optimization
Algorithms", arXiv:2302.06675), with the cautious option (arXiv:2411.16085)."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim._cautious import cautious_masks
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, betas, flag, lr, nonneg, with_max_lr_snapshot

__all__ = ["Lion"]


class Lion(DistOptimizer):
    r"""Lion, with the options and defaults of timm's ``Lion`` (names ``lion``, ``clion``).

    Update rule (element-wise; the cautious mask's mean is over the whole tensor)::

        p <- p * (1 - s * weight_decay)          (s = lr, or lr^2 / max_lr with corrected_weight_decay)
        u  = sign(beta1 * m + (1 - beta1) * g)
        u <- u * 1[u * g > 0] / max(mean(1[u * g > 0]), 1e-3)      if caution
        p <- p - lr * u
        m <- beta2 * m + (1 - beta2) * g

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-4).
        betas: interpolation of the update and decay of the momentum (default (0.9, 0.99)).
        weight_decay: decoupled weight decay (default 0).
        caution: the cautious mask (default False).
        corrected_weight_decay: decay by ``lr^2 / max_lr``, ``max_lr`` the constructor's lr
            (kept as ``max_lr_snapshot``) (default False).
        maximize: maximize the objective (default False).

    State per parameter: ``exp_avg``.  Element-wise, exact under any sharding; with
    ``caution`` the mask's mean is one batched reduction.
    """

    elementwise = True

    hypers = HyperSpec(
        lr(1e-4),
        betas((0.9, 0.99)),
        nonneg("weight_decay", 0.0),
        flag("caution", False),
        flag("corrected_weight_decay", False),
        KW_ONLY,
        flag("maximize", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        return bool(group["caution"])

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["exp_avg"] = self._zeros(view)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        exp_avgs = [v.state["exp_avg"] for v in views]
        wd = group["weight_decay"]
        if wd != 0.0:
            s = lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
            torch._foreach_mul_(params, 1.0 - s * wd)
        updates = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_sign_(updates)
        if group["caution"]:
            torch._foreach_mul_(updates, cautious_masks(ctx, views, updates, grads))
        torch._foreach_add_(params, updates, alpha=-lr)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta2)
