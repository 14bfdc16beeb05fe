"""SGDP: SGD with momentum and the projection of AdamP (Heo et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import REQUIRED, HyperSpec, flag, lr, nonneg
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

    hypers = HyperSpec(
        lr(REQUIRED),
        nonneg("momentum", 0.0),
        nonneg("dampening", 0.0),
        nonneg("weight_decay", 0.0),
        flag("nesterov", False),
        nonneg("eps", 1e-8),
        nonneg("delta", 0.1),
        nonneg("wd_ratio", 0.1),
        flag("caution", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if hypers["weight_decay"] != 0.0 and hypers["momentum"] >= 1.0:
            raise ValueError(
                f"Invalid momentum: {hypers['momentum']} (weight decay is divided by 1 - momentum, "
                "so momentum must be < 1 when weight_decay != 0)"
            )
        return params, hypers

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["momentum"] = self._zeros(view)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        momentum, wd = group["momentum"], group["weight_decay"]
        params, grads, bufs = F.columns(views, "momentum")
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
