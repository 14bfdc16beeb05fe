"""Adamax: Adam with the infinity norm (Kingma & Ba, 2015, section 7), torch.optim semantics."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, adam_hypers, flag

__all__ = ["Adamax"]


class Adamax(DistOptimizer):
    r"""Adamax, with the options and defaults of ``torch.optim.Adamax``.

    Update rule for step ``t`` (element-wise)::

        g  <- -g if maximize
        g  <- g + weight_decay * p                       # L2 penalty
        m  <- beta1 * m + (1 - beta1) * g
        u  <- max(beta2 * u, |g| + eps)
        p  <- p - lr / (1 - beta1^t) * m / u

    Args:
        params: parameters or param groups.
        lr: learning rate (default 2e-3).
        betas: coefficients of the running average and of the infinity norm (default (0.9, 0.999)).
        eps: term added to ``|g|`` (default 1e-8).
        weight_decay: L2 penalty (default 0).
        maximize: maximize the objective instead of minimizing it (default False).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_inf`` (fp32 for
    bf16/fp16 parameters).  Element-wise: exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    hypers = HyperSpec(
        *adam_hypers(2e-3),
        KW_ONLY,
        flag("maximize", False),
    )

    _zero_state = ("exp_avg", "exp_inf")

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        params, grads, exp_avgs, exp_infs = F.columns(views, "exp_avg", "exp_inf")
        steps = F.advance_steps(views)
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        grads = F.l2_decay(grads, params, group["weight_decay"])
        F.ema_(exp_avgs, grads, beta1)
        torch._foreach_mul_(exp_infs, beta2)
        abs_grads = torch._foreach_abs(grads)
        torch._foreach_add_(abs_grads, group["eps"])
        torch._foreach_maximum_(exp_infs, abs_grads)
        del abs_grads
        torch._foreach_addcdiv_(params, exp_avgs, exp_infs, [-lr / b for b in F.bias_correction(beta1, steps)])
