"""SGD with momentum, dampening and Nesterov momentum (torch.optim.SGD semantics)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import (
    DistOptimizer,
    ParamView,
    StepContext,
    check_lr,
    check_nonneg,
)

__all__ = ["SGD"]


class SGD(DistOptimizer):
    r"""Stochastic gradient descent, with the options and defaults of ``torch.optim.SGD``.

    Update rule (element-wise)::

        g  <- -g if maximize
        g  <- g + weight_decay * p                       # L2 penalty
        b  <- g                                          # at the buffer's first step
        b  <- momentum * b + (1 - dampening) * g         # afterwards
        d  = g + momentum * b  if nesterov  else  b      (d = g when momentum == 0)
        p  <- p - lr * d

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        momentum: momentum factor (default 0).
        dampening: dampening of the momentum (default 0).
        weight_decay: L2 penalty (default 0).
        nesterov: Nesterov momentum; needs momentum > 0 and dampening 0 (default False).
        maximize: maximize the objective instead of minimizing it (default False).

    State per parameter (momentum != 0 only): ``momentum_buffer``, created from the gradient at
    the parameter's first step with momentum, as torch does (fp32 for bf16/fp16 parameters).
    Element-wise: exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        check_lr(lr)
        check_nonneg(momentum, "momentum")
        check_nonneg(dampening, "dampening")
        check_nonneg(weight_decay, "weight_decay")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        # The momentum buffer starts as the first gradient (torch semantics), so it is created
        # in _update, where that gradient (after maximize and weight decay) is known.
        pass

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        momentum, dampening = group["momentum"], group["dampening"]
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        grads = F.l2_decay(grads, params, group["weight_decay"])
        if momentum == 0:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        old = [i for i, v in enumerate(views) if "momentum_buffer" in v.state]
        if old:
            bufs = [views[i].state["momentum_buffer"] for i in old]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1.0 - dampening)
        for i, v in enumerate(views):
            if "momentum_buffer" not in v.state:
                v.state["momentum_buffer"] = grads[i].detach().clone(memory_format=torch.preserve_format)
        bufs = [v.state["momentum_buffer"] for v in views]
        if group["nesterov"]:
            torch._foreach_add_(params, torch._foreach_add(grads, bufs, alpha=momentum), alpha=-lr)
        else:
            torch._foreach_add_(params, bufs, alpha=-lr)
