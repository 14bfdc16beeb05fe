"""SGDP: SGD with momentum and the projection of AdamP (Heo et al., ICLR 2021)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from distopt.optim._core import DistOptimizer, ParamView, StepContext, check_lr, check_nonneg
from distopt.optim._projection import project_


class SGDP(DistOptimizer):
    r"""SGDP, with the options of timm's implementation.

    Update rule (``g`` the gradient; the momentum buffer starts at zero)::

        b <- momentum * b + (1 - dampening) * g
        u = g + momentum * b            if nesterov, else b
        u, r = project(w, g, u)         see :class:`~distopt.optim.AdamP` (r = wd_ratio when a
                                        projection was applied, else 1)
        w <- w * (1 - lr * weight_decay * r / (1 - momentum))     (only when weight_decay != 0)
        w <- w - lr * u

    Args:
        params: parameters or param groups.
        lr: learning rate (required, as in timm).
        momentum: momentum factor (default 0).
        dampening: dampening of the gradient in the buffer (default 0).
        weight_decay: decoupled weight decay, divided by ``1 - momentum`` (default 0).
        nesterov: Nesterov momentum (default False).
        eps: cosine / normalisation epsilon of the projection (default 1e-8).
        delta: threshold of the cosine test (default 0.1).
        wd_ratio: weight-decay multiplier of projected tensors (default 0.1).
        caution: cautious masking of the update (default False).

    State per parameter: ``momentum`` (the buffer, timm's name).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        caution: bool = False,
    ) -> None:
        check_lr(lr)
        check_nonneg(momentum, "momentum")
        check_nonneg(dampening, "dampening")
        check_nonneg(weight_decay, "weight_decay")
        check_nonneg(eps, "eps")
        check_nonneg(delta, "delta")
        check_nonneg(wd_ratio, "wd_ratio")
        if weight_decay != 0.0 and momentum >= 1.0:
            raise ValueError(
                f"Invalid momentum: {momentum} (weight decay is divided by 1 - momentum, so momentum "
                "must be < 1 when weight_decay != 0)"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            caution=caution,
        )
        super().__init__(params, defaults)

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["momentum"] = self._zeros(view)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        momentum, wd = group["momentum"], group["weight_decay"]
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        bufs = [v.state["momentum"] for v in views]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1.0 - group["dampening"])
        if group["nesterov"]:
            updates = torch._foreach_add(grads, bufs, alpha=momentum)
        else:
            updates = torch._foreach_mul(bufs, 1.0)  # a copy: the projection works in place
        ratios = project_(
            ctx, views, grads, updates, group["delta"], group["wd_ratio"], group["eps"], group["caution"]
        )
        if wd != 0.0 and lr != 0.0:
            torch._foreach_mul_(params, [1.0 - lr * wd * r / (1.0 - momentum) for r in ratios])
        torch._foreach_add_(params, updates, alpha=-lr)
