"""Adadelta (Zeiler, 2012), torch.optim.Adadelta semantics."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, flag, lr, nonneg

__all__ = ["Adadelta"]


class Adadelta(DistOptimizer):
    r"""Adadelta, with the options and defaults of ``torch.optim.Adadelta``.

    Update rule (element-wise)::

        g  <- -g if maximize
        g  <- g + weight_decay * p                       # L2 penalty
        v  <- rho * v + (1 - rho) * g^2
        d  = sqrt(u + eps) / sqrt(v + eps) * g
        u  <- rho * u + (1 - rho) * d^2
        p  <- p - lr * d

    Args:
        params: parameters or param groups.
        lr: coefficient that scales the delta (default 1.0).
        rho: coefficient of the running averages (default 0.9).
        eps: term added inside the square roots (default 1e-6).
        weight_decay: L2 penalty (default 0).
        maximize: maximize the objective instead of minimizing it (default False).

    State per parameter: ``step`` (float32 scalar), ``square_avg``, ``acc_delta`` (fp32 for
    bf16/fp16 parameters).  Element-wise: exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    hypers = HyperSpec(
        lr(1.0),
        nonneg("rho", 0.9, at_most=1.0),
        nonneg("eps", 1e-6),
        nonneg("weight_decay", 0.0),
        KW_ONLY,
        flag("maximize", False),
    )

    _zero_state = ("square_avg", "acc_delta")

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        rho, eps = group["rho"], group["eps"]
        params, grads, square_avgs, acc_deltas = F.columns(views, "square_avg", "acc_delta")
        F.advance_steps(views)
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        grads = F.l2_decay(grads, params, group["weight_decay"])
        F.ema_sq_(square_avgs, grads, rho)
        std = torch._foreach_add(square_avgs, eps)
        torch._foreach_sqrt_(std)
        deltas = torch._foreach_add(acc_deltas, eps)
        torch._foreach_sqrt_(deltas)
        torch._foreach_div_(deltas, std)
        torch._foreach_mul_(deltas, grads)
        F.ema_sq_(acc_deltas, deltas, rho)
        torch._foreach_add_(params, deltas, alpha=-lr)
