"""Adam and AdamW (Kingma & Ba, 2015; Loshchilov & Hutter, 2019): one implementation.

:class:`Adam` (torch.optim.Adam semantics: L2 decay coupled to the gradient, or decoupled on
request) and :class:`~distopt.optim.AdamW` (decoupled decay, plus the legacy transformers
arithmetic) declare their own hyperparameters and share :class:`AdamFamily`'s state and update.
"""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext, fused_steps
from distopt.optim._hyper import KW_ONLY, HyperSpec, adam_hypers, flag

__all__ = ["Adam", "AdamFamily"]


class AdamFamily(DistOptimizer):
    """State and update shared by :class:`Adam` and :class:`~distopt.optim.AdamW`.

    A subclass says through :meth:`_arithmetic` which variant a param group runs: whether the
    decay is decoupled, whether Adam's bias corrections apply, and whether the legacy
    transformers order (``eps`` added to ``sqrt(v)`` before the bias correction; decay after
    the update) is used.  State per parameter: ``step`` (float32 scalar), ``exp_avg``,
    ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    def _arithmetic(self, group: dict[str, Any]) -> tuple[bool, bool, bool]:  # pragma: no cover
        """``(decoupled, correct_bias, transformers_order)`` of ``group``."""
        raise NotImplementedError

    _zero_state = ("exp_avg", "exp_avg_sq", ("max_exp_avg_sq", "amsgrad"))

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        decoupled, correct_bias, transformers_order = self._arithmetic(group)
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        amsgrad, maximize = group["amsgrad"], group["maximize"]
        params, grads, exp_avgs, exp_avg_sqs = F.columns(views, "exp_avg", "exp_avg_sq")
        max_sqs = [v.state["max_exp_avg_sq"] for v in views] if amsgrad else []

        if correct_bias and not transformers_order and F.fused_adam_ok(params):
            steps = fused_steps(views)  # on the parameters' device, as torch's fused path keeps them
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
        if correct_bias:
            bc1, bc2 = F.bias_correction(beta1, steps), F.bias_correction(beta2, steps)
        else:
            bc1 = bc2 = [1.0] * len(views)
        if not decoupled:
            grads = F.l2_decay(grads, params, wd)
        elif not transformers_order:
            F.decoupled_decay_(params, lr, wd)
        F.ema_(exp_avgs, grads, beta1)
        F.ema_sq_(exp_avg_sqs, grads, beta2)
        second = F.amsgrad_max_(max_sqs, exp_avg_sqs) if amsgrad else exp_avg_sqs
        if transformers_order:
            denom = torch._foreach_sqrt(second)
            torch._foreach_add_(denom, eps)
            step_sizes = [-lr * (b2**0.5) / b1 for b1, b2 in zip(bc1, bc2)]
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
            if wd != 0.0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
        else:
            denom = F.adam_denominator(second, bc2, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bc1])


class Adam(AdamFamily):
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

    hypers = HyperSpec(
        *adam_hypers(1e-3),
        flag("amsgrad", False),
        KW_ONLY,
        flag("maximize", False),
        flag("decoupled_weight_decay", False),
    )

    def _arithmetic(self, group: dict[str, Any]) -> tuple[bool, bool, bool]:
        return bool(group["decoupled_weight_decay"]), True, False
