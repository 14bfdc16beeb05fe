"""SGD with momentum, dampening and Nesterov momentum (torch.optim.SGD semantics)."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, check_nesterov, flag, lr, nonneg

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

    hypers = HyperSpec(
        lr(1e-3),
        nonneg("momentum", 0.0),
        nonneg("dampening", 0.0),
        nonneg("weight_decay", 0.0),
        flag("nesterov", False),
        KW_ONLY,
        flag("maximize", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        check_nesterov(hypers)
        return params, hypers

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        # The momentum buffer starts as the first gradient (torch semantics), so it is created
        # in _update, where that gradient (after maximize and weight decay) is known.
        pass

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        momentum, dampening = group["momentum"], group["dampening"]
        params, grads = F.columns(views)
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
