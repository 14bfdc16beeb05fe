"""Adan: adaptive Nesterov momentum (Xie et al., 2022, arXiv:2208.06677), timm's options."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._cautious import cautious_masks
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, betas, flag, lr, nonneg

__all__ = ["Adan"]


class Adan(DistOptimizer):
    r"""Adan, with timm's options and defaults (names ``adan``, ``adanw``: ``no_prox``, ``cadan``).

    Update rule for step ``t`` (element-wise; the cautious mask's mean is over the whole tensor),
    ``d = g - g_prev`` (0 at a parameter's first step)::

        m <- beta1 m + (1 - beta1) g
        e <- beta2 e + (1 - beta2) d
        v <- beta3 v + (1 - beta3) (g + beta2 d)^2
        D  = sqrt(v) / sqrt(1 - beta3^t) + eps
        u  = lr / (1 - beta1^t) * m / D + lr * beta2 / (1 - beta2^t) * e / D
             (m * cautious mask(m, g) if caution)
        no_prox: p <- p * (1 - lr * wd) - u;   else: p <- (p - u) / (1 + lr * wd)

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2, beta3)`` (default (0.98, 0.92, 0.99)).
        eps: denominator term (default 1e-8).
        weight_decay: weight decay (default 0).
        no_prox: decoupled decay before the step instead of the proximal division (default False).
        caution: the cautious mask (default False).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``exp_avg_diff``,
    ``neg_pre_grad`` (minus the previous gradient).  timm counts steps per param group; distopt
    per parameter (the same unless a parameter misses steps).
    """

    elementwise = True

    hypers = HyperSpec(
        lr(1e-3),
        betas((0.98, 0.92, 0.99), n=3),
        nonneg("eps", 1e-8),
        nonneg("weight_decay", 0.0),
        flag("no_prox", False),
        flag("caution", False),
    )

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        return bool(group["caution"])

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["exp_avg"] = self._zeros(view)
        view.state["exp_avg_sq"] = self._zeros(view)
        view.state["exp_avg_diff"] = self._zeros(view)
        view.state["neg_pre_grad"] = -view.grad.detach().to(view.data.dtype)  # so d = 0 at step 1

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2, beta3 = group["betas"]
        wd = group["weight_decay"]
        steps = F.advance_steps(views)
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        m = [v.state["exp_avg"] for v in views]
        e = [v.state["exp_avg_diff"] for v in views]
        sq = [v.state["exp_avg_sq"] for v in views]
        diff = [v.state["neg_pre_grad"] for v in views]
        torch._foreach_add_(diff, grads)  # g - g_prev
        F.ema_(m, grads, beta1)
        F.ema_(e, diff, beta2, 1.0 - beta2)
        torch._foreach_mul_(diff, beta2)
        torch._foreach_add_(diff, grads)  # g + beta2 (g - g_prev)
        F.ema_sq_(sq, diff, beta3)
        denom = torch._foreach_sqrt(sq)
        torch._foreach_div_(denom, [b**0.5 for b in F.bias_correction(beta3, steps)])
        torch._foreach_add_(denom, group["eps"])
        num = torch._foreach_mul(m, cautious_masks(ctx, views, m, grads)) if group["caution"] else m
        if group["no_prox"] and wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_addcdiv_(
            params, num, denom, [-lr / b for b in F.bias_correction(beta1, steps)]
        )
        torch._foreach_addcdiv_(
            params, e, denom, [-lr * beta2 / b for b in F.bias_correction(beta2, steps)]
        )
        if not group["no_prox"] and wd != 0.0:
            torch._foreach_div_(params, 1.0 + lr * wd)
        torch._foreach_zero_(diff)
        torch._foreach_sub_(diff, grads)  # -g: the next step's g_prev
