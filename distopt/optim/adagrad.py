"""Adagrad (Duchi et al., 2011), torch.optim.Adagrad semantics (dense gradients)."""

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

__all__ = ["Adagrad"]


class Adagrad(DistOptimizer):
    r"""Adagrad, with the options and defaults of ``torch.optim.Adagrad``.

    Update rule for step ``t`` (element-wise)::

        g  <- -g if maximize
        g  <- g + weight_decay * p                       # L2 penalty
        s  <- s + g^2                                    (s starts at initial_accumulator_value)
        p  <- p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-2).
        lr_decay: learning-rate decay (default 0).
        weight_decay: L2 penalty (default 0).
        initial_accumulator_value: starting value of the sum of squares (default 0).
        eps: term added to the denominator (default 1e-10).
        maximize: maximize the objective instead of minimizing it (default False).

    State per parameter: ``step`` (float32 scalar), ``sum`` (fp32 for bf16/fp16 parameters).
    Element-wise: exact under any sharding without communication.  Unlike torch, sparse
    gradients are not supported.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
    ) -> None:
        check_lr(lr)
        check_nonneg(lr_decay, "lr_decay")
        check_nonneg(weight_decay, "weight_decay")
        check_nonneg(initial_accumulator_value, "initial_accumulator_value")
        check_nonneg(eps, "eps")
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["sum"] = torch.full_like(
            view.data, group["initial_accumulator_value"], memory_format=torch.preserve_format
        )

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        sums = [v.state["sum"] for v in views]
        steps = F.advance_steps(views)
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        grads = F.l2_decay(grads, params, group["weight_decay"])
        torch._foreach_addcmul_(sums, grads, grads, value=1.0)
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, group["eps"])
        sizes = [-lr / (1.0 + (t - 1.0) * group["lr_decay"]) for t in steps]
        torch._foreach_addcdiv_(params, grads, std, sizes)
