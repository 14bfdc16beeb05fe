"""AdaBelief: adapting step sizes by the belief in observed gradients (Zhuang et al., 2020)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
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
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

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
        decoupled, rectify = group["decoupled_decay"], group["rectify"]
        scalars = []
        for t in F.advance_steps(views):
            bc1 = 1.0 - beta1**t
            if not rectify:
                adaptive, size = 1.0, lr / bc1
            else:
                rect = rectification(beta1, beta2, t)[1]
                adaptive = 0.0 if rect is None else 1.0
                size = (
                    lr * rect
                    if rect is not None
                    else (lr / bc1 if group["degenerated_to_sgd"] else 0.0)
                )
            scalars.append({
                "decay": 1.0 - (wd if group["fixed_decay"] else lr * wd), "wd": wd, "beta1": beta1,
                "beta2": beta2, "eps": eps, "bc2_sqrt": math.sqrt(1.0 - beta2**t), "adaptive": adaptive,
                "size": size,
            })  # fmt: skip
        states = ("exp_avg", "exp_avg_var") + (("max_exp_avg_var",) if group["amsgrad"] else ())
        K.apply(
            self,
            adabelief_rule,
            views,
            states,
            scalars,
            decoupled=bool(decoupled),
            amsgrad=bool(group["amsgrad"]),
            rectify=bool(rectify),
        )


def adabelief_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    decoupled: bool,
    amsgrad: bool,
    rectify: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """AdaBelief's update of one tensor (see :class:`AdaBelief`; ``s["size"]`` is the step size
    of this step and ``s["adaptive"]`` whether the rectified step is adaptive)."""
    if decoupled:
        p = p * s["decay"]
    else:
        g = g + s["wd"] * p
    m = torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"])
    r = g - m
    v = K.ema_sq(st["exp_avg_var"], r, s["beta2"]) + s["eps"]
    new = {"exp_avg": m, "exp_avg_var": v}
    if amsgrad:
        new["max_exp_avg_var"] = torch.maximum(st["max_exp_avg_var"], v)
    if not rectify:
        second = new["max_exp_avg_var"] if amsgrad else v
        return p - (s["size"] * m) / (second.sqrt() / s["bc2_sqrt"] + s["eps"]), new
    adaptive = p - (s["size"] * m) / (v.sqrt() + s["eps"])
    return torch.where(s["adaptive"] > 0, adaptive, p - s["size"] * m), new
