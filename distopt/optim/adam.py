"""Adam with L2 (coupled) weight decay (Kingma & Ba, 2015), torch.optim.Adam semantics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import (
    DistOptimizer,
    ParamView,
    StepContext,
    check_betas,
    check_lr,
    check_nonneg,
)

__all__ = ["Adam"]


class Adam(DistOptimizer):
    r"""Adam, with the options and defaults of ``torch.optim.Adam``.

    Update rule for step ``t`` (element-wise)::

        g  <- -g if maximize
        g  <- g + weight_decay * p          (p <- p * (1 - lr * wd) if decoupled_weight_decay)
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        v' <- max(v', v)  if amsgrad else v
        p  <- p - lr / (1 - beta1^t) * m / (sqrt(v' / (1 - beta2^t)) + eps)

    Unlike :class:`~distopt.optim.AdamW`, the weight decay is by default an L2 penalty added to
    the gradient, so it passes through the adaptive normalisation.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the running averages (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8).
        weight_decay: L2 penalty (default 0).
        amsgrad: use the AMSGrad maximum of the second moment (default False).
        maximize: maximize the objective instead of minimizing it (default False).
        decoupled_weight_decay: decay the weights directly, making this AdamW (default False).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq`` (fp32 for bf16/fp16 parameters).  When all local tensors share a
    floating dtype and a CPU/CUDA device the update runs in torch's fused multi-tensor kernel.
    Element-wise: exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_nonneg(eps, "eps")
        check_nonneg(weight_decay, "weight_decay")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["exp_avg"] = self._zeros(view)
        view.state["exp_avg_sq"] = self._zeros(view)
        if group["amsgrad"]:
            view.state["max_exp_avg_sq"] = self._zeros(view)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        amsgrad, maximize, decoupled = group["amsgrad"], group["maximize"], group["decoupled_weight_decay"]
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        exp_avgs = [v.state["exp_avg"] for v in views]
        exp_avg_sqs = [v.state["exp_avg_sq"] for v in views]
        max_sqs = [v.state["max_exp_avg_sq"] for v in views] if amsgrad else []

        if F.fused_adam_ok(params):
            steps = [v.state["step"] for v in views]
            torch._foreach_add_(steps, 1.0)
            fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
            fused(
                params, list(grads), exp_avgs, exp_avg_sqs, max_sqs, steps,
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps,
                amsgrad=amsgrad, maximize=maximize,
            )  # fmt: skip
            return

        steps = F.advance_steps(views)
        if maximize:
            grads = torch._foreach_neg(grads)
        if decoupled:
            F.decoupled_decay_(params, lr, wd)
        else:
            grads = F.l2_decay(grads, params, wd)
        F.ema_(exp_avgs, grads, beta1)
        F.ema_sq_(exp_avg_sqs, grads, beta2)
        second = F.amsgrad_max_(max_sqs, exp_avg_sqs) if amsgrad else exp_avg_sqs
        denom = F.adam_denominator(second, F.bias_correction(beta2, steps), eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in F.bias_correction(beta1, steps)])

