"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019)."""

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


class AdamW(DistOptimizer):
    r"""AdamW with decoupled weight decay.

    Update rule for step ``t`` (``g`` the gradient, all operations element-wise)::

        p  <- p * (1 - lr * weight_decay)                 # decoupled decay, before the update
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        v' <- max(v', v)  if amsgrad else v
        p  <- p - lr / (1 - beta1^t) * m / (sqrt(v' / (1 - beta2^t)) + eps)

    With ``correct_bias=False`` the two bias corrections are 1.  ``transformers_order=True``
    reproduces the legacy ``transformers.AdamW`` arithmetic: ``eps`` is added to ``sqrt(v)``
    before the bias correction is applied to the step size, and the decay ``p <- p - lr * wd * p``
    is applied *after* the Adam update.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the running averages (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2).
        amsgrad: use the AMSGrad maximum of the second moment (default False).
        maximize: maximize the objective instead of minimizing it (default False).
        correct_bias: apply Adam's bias corrections (default True).
        transformers_order: legacy transformers arithmetic, see above (default False).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq`` (fp32 for bf16/fp16 parameters).  With the default arithmetic
    the update runs in torch's fused multi-tensor AdamW kernel.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        correct_bias: bool = True,
        transformers_order: bool = False,
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
            correct_bias=correct_bias,
            transformers_order=transformers_order,
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
        amsgrad, maximize = group["amsgrad"], group["maximize"]
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        exp_avgs = [v.state["exp_avg"] for v in views]
        exp_avg_sqs = [v.state["exp_avg_sq"] for v in views]
        max_sqs = [v.state["max_exp_avg_sq"] for v in views] if amsgrad else []

        if group["correct_bias"] and not group["transformers_order"] and F.fused_adam_ok(params):
            steps = [v.state["step"] for v in views]
            torch._foreach_add_(steps, 1.0)
            torch._fused_adamw_(
                params, list(grads), exp_avgs, exp_avg_sqs, max_sqs, steps,
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps,
                amsgrad=amsgrad, maximize=maximize,
            )  # fmt: skip
            return

        steps = F.advance_steps(views)
        if maximize:
            grads = torch._foreach_neg(grads)
        if group["correct_bias"]:
            bc1, bc2 = F.bias_correction(beta1, steps), F.bias_correction(beta2, steps)
        else:
            bc1 = bc2 = [1.0] * len(views)
        if not group["transformers_order"]:
            F.decoupled_decay_(params, lr, wd)
        F.ema_(exp_avgs, grads, beta1)
        F.ema_sq_(exp_avg_sqs, grads, beta2)
        second = F.amsgrad_max_(max_sqs, exp_avg_sqs) if amsgrad else exp_avg_sqs
        if group["transformers_order"]:
            denom = torch._foreach_sqrt(second)
            torch._foreach_add_(denom, eps)
            step_sizes = [-lr * (b2**0.5) / b1 for b1, b2 in zip(bc1, bc2)]
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
            if wd != 0.0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
        else:
            denom = F.adam_denominator(second, bc2, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bc1])

