"""AdaBelief: adapting step sizes by the belief in observed gradients (Zhuang et al., 2020)."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, adam_hypers, flag
from distopt.optim.radam import rectification

__all__ = ["AdaBelief"]


class AdaBelief(DistOptimizer):
    r"""AdaBelief, with the options and defaults of timm's implementation.

    Instead of the second moment of the gradient, AdaBelief tracks the variance of the gradient
    around its running mean (the "belief").  Update rule for step ``t`` (element-wise)::

        decay:  p <- p * (1 - lr * wd)      if decoupled_decay and not fixed_decay
                p <- p * (1 - wd)           if decoupled_decay and fixed_decay
                g <- g + wd * p             otherwise (L2 penalty)
        m  <- beta1 * m + (1 - beta1) * g
        s  <- beta2 * s + (1 - beta2) * (g - m)^2 + eps        # eps accumulates into the state
        s' <- max(s', s)  if amsgrad else s
        rectify=False:  p <- p - lr / (1 - beta1^t) * m / (sqrt(s' / (1 - beta2^t)) + eps)
        rectify=True:   rho_t >= 5:  p <- p - lr * r_t / (1 - beta1^t) * m / (sqrt(s) + eps)
                        otherwise:   p <- p - lr / (1 - beta1^t) * m   if degenerated_to_sgd
                                     (no update)                       otherwise

    ``rho_t`` and ``r_t`` are RAdam's rectification (see :func:`distopt.optim.radam.rectification`):
    scalars that depend on the step count only.  As in the reference implementation, the
    rectified update uses ``s`` itself: with ``rectify=True`` the AMSGrad maximum is kept in the
    state but does not enter the update.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the running averages (default (0.9, 0.999)).
        eps: term added to the variance and to the denominator (default 1e-16).
        weight_decay: weight decay (default 0).
        amsgrad: keep the running maximum of ``s`` (default False).
        decoupled_decay: decay the weights directly, as in AdamW (default True).
        fixed_decay: with ``decoupled_decay``, decay by ``wd`` instead of ``lr * wd`` (default False).
        rectify: use RAdam's rectified update (default True).
        degenerated_to_sgd: with ``rectify``, take an SGD-with-momentum step while the variance of
            the adaptive rate is intractable (``rho_t < 5``) instead of no step (default True).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_var`` and, with
    amsgrad, ``max_exp_avg_var`` (fp32 for bf16/fp16 parameters).  Element-wise: exact under any
    sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    hypers = HyperSpec(
        *adam_hypers(1e-3, eps_default=1e-16),
        flag("amsgrad", False),
        flag("decoupled_decay", True),
        flag("fixed_decay", False),
        flag("rectify", True),
        flag("degenerated_to_sgd", True),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if hypers["fixed_decay"] and hypers["weight_decay"] >= 1.0:
            raise ValueError(
                f"Invalid weight_decay: {hypers['weight_decay']} (must be < 1 with fixed_decay)"
            )
        return params, hypers

    _zero_state = ("exp_avg", "exp_avg_var", ("max_exp_avg_var", "amsgrad"))

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        amsgrad = group["amsgrad"]
        params, grads, exp_avgs, exp_avg_vars = F.columns(views, "exp_avg", "exp_avg_var")
        steps = F.advance_steps(views)

        if group["decoupled_decay"]:
            decay = wd if group["fixed_decay"] else lr * wd
            if decay != 0.0:
                torch._foreach_mul_(params, 1.0 - decay)
        else:
            grads = F.l2_decay(grads, params, wd)

        F.ema_(exp_avgs, grads, beta1)
        residuals = torch._foreach_sub(grads, exp_avgs)
        F.ema_sq_(exp_avg_vars, residuals, beta2)
        del residuals
        torch._foreach_add_(exp_avg_vars, eps)
        if amsgrad:
            F.amsgrad_max_([v.state["max_exp_avg_var"] for v in views], exp_avg_vars)

        if not group["rectify"]:
            second = [v.state["max_exp_avg_var"] for v in views] if amsgrad else exp_avg_vars
            denom = F.adam_denominator(second, F.bias_correction(beta2, steps), eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in F.bias_correction(beta1, steps)])
            return

        rect = [rectification(beta1, beta2, t)[1] for t in steps]
        adaptive = [i for i, r in enumerate(rect) if r is not None]
        if adaptive:
            denom = torch._foreach_sqrt([exp_avg_vars[i] for i in adaptive])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(
                [params[i] for i in adaptive],
                [exp_avgs[i] for i in adaptive],
                denom,
                [-lr * rect[i] for i in adaptive],
            )
        if group["degenerated_to_sgd"]:
            plain = [i for i, r in enumerate(rect) if r is None]
            if plain:
                sizes = [-lr / (1.0 - beta1 ** steps[i]) for i in plain]
                torch._foreach_add_([params[i] for i in plain], torch._foreach_mul([exp_avgs[i] for i in plain], sizes))
