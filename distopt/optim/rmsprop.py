"""RMSprop (Hinton; centered: Graves, 2013), torch.optim.RMSprop semantics."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, flag, lr, nonneg

__all__ = ["RMSprop"]


class RMSprop(DistOptimizer):
    r"""RMSprop, with the options and defaults of ``torch.optim.RMSprop``.

    (For TensorFlow's arithmetic, as in timm's EfficientNet recipes, see
    :class:`~distopt.optim.RMSpropTF`.)  Update rule (element-wise, ``a = alpha``)::

        g  <- -g if maximize
        g  <- g + weight_decay * p                       # L2 penalty
        v  <- a * v + (1 - a) * g^2
        centered:  c <- a * c + (1 - a) * g;  d = sqrt(v - c^2) + eps
        otherwise: d = sqrt(v) + eps
        momentum > 0:  b <- momentum * b + g / d;  p <- p - lr * b
        otherwise:     p <- p - lr * g / d

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-2).
        alpha: smoothing constant (default 0.99).
        eps: term added to the denominator (default 1e-8).
        weight_decay: L2 penalty (default 0).
        momentum: momentum factor (default 0).
        centered: normalise by an estimate of the gradient's variance (default False).
        maximize: maximize the objective instead of minimizing it (default False).

    State per parameter: ``step`` (float32 scalar), ``square_avg``, ``momentum_buffer``
    (momentum > 0), ``grad_avg`` (centered); fp32 for bf16/fp16 parameters.  Element-wise:
    exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    hypers = HyperSpec(
        lr(1e-2),
        nonneg("alpha", 0.99),
        nonneg("eps", 1e-8),
        nonneg("weight_decay", 0.0),
        nonneg("momentum", 0.0),
        flag("centered", False),
        KW_ONLY,
        flag("maximize", False),
    )

    _zero_state = ("square_avg", ("momentum_buffer", "momentum"), ("grad_avg", "centered"))

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        alpha, eps, momentum = group["alpha"], group["eps"], group["momentum"]
        params, grads, square_avgs = F.columns(views, "square_avg")
        F.advance_steps(views)
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        grads = F.l2_decay(grads, params, group["weight_decay"])
        F.ema_sq_(square_avgs, grads, alpha)
        if group["centered"]:
            grad_avgs = [v.state["grad_avg"] for v in views]
            torch._foreach_lerp_(grad_avgs, grads, 1.0 - alpha)
            denom = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1.0)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(square_avgs)
        torch._foreach_add_(denom, eps)
        if momentum > 0:
            bufs = [v.state["momentum_buffer"] for v in views]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_addcdiv_(bufs, grads, denom)
            torch._foreach_add_(params, bufs, alpha=-lr)
        else:
            torch._foreach_addcdiv_(params, grads, denom, value=-lr)
