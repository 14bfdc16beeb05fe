"""Nadam: Adam with Nesterov momentum and a warming momentum schedule (Dozat, 2016)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, adam_hypers, nonneg

__all__ = ["Nadam"]


class Nadam(DistOptimizer):
    r"""Nadam with the semantics and defaults of timm's ``NAdamLegacy``.

    The momentum coefficient warms up along a schedule ``mu_t = beta1 * (1 - 0.5 * 0.96^(t * sd))``
    (``sd = schedule_decay``) and each parameter keeps the running product
    ``m_schedule = mu_1 * ... * mu_t``.  Update rule for step ``t`` (element-wise)::

        g  <- g + weight_decay * p                              # L2 penalty
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        d  = sqrt(v / (1 - beta2^t)) + eps
        p  <- p - lr * (1 - mu_t) / (1 - m_schedule_t) * g / d
                - lr * mu_{t+1} / (1 - m_schedule_t * mu_{t+1}) * m / d

    Args:
        params: parameters or param groups.
        lr: learning rate (default 2e-3).
        betas: coefficients of the running averages (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8).
        weight_decay: L2 penalty added to the gradient (default 0).
        schedule_decay: decay of the momentum schedule (default 4e-3).

    State per parameter: ``step`` (float32 scalar), ``m_schedule`` (a Python float, the running
    product of the momentum schedule, as timm keeps it), ``exp_avg``, ``exp_avg_sq`` (fp32 for
    bf16/fp16 parameters).  Element-wise: exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    hypers = HyperSpec(
        *adam_hypers(2e-3),
        nonneg("schedule_decay", 4e-3),
    )

    _zero_state = ("exp_avg", "exp_avg_sq")

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        super()._init_state(group, view)
        view.state["m_schedule"] = 1.0

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        sd = group["schedule_decay"]
        scalars = []
        for v, t in zip(views, F.advance_steps(views)):
            mu_t = beta1 * (1.0 - 0.5 * 0.96 ** (t * sd))
            mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * sd))
            sched = v.state["m_schedule"] * mu_t
            v.state["m_schedule"] = sched
            scalars.append(
                {
                    "gsize": -lr * (1.0 - mu_t) / (1.0 - sched),
                    "msize": -lr * mu_next / (1.0 - sched * mu_next),
                    "beta1": beta1,
                    "beta2": beta2,
                    "bc2_sqrt": (1.0 - beta2**t) ** 0.5,
                    "eps": group["eps"],
                    "wd": group["weight_decay"],
                }
            )
        K.apply(
            self,
            nadam_rule,
            views,
            ("exp_avg", "exp_avg_sq"),
            scalars,
            l2=group["weight_decay"] != 0.0,
        )


def nadam_rule(
    p: Tensor, g: Tensor, st: dict[str, Tensor], s: dict[str, Tensor], *, l2: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Nadam's update of one tensor (see :class:`Nadam`)."""
    if l2:
        g = g + s["wd"] * p
    m = torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"])
    v = K.ema_sq(st["exp_avg_sq"], g, s["beta2"])
    denom = v.sqrt() / s["bc2_sqrt"] + s["eps"]
    p = p + (s["gsize"] * g) / denom
    return p + (s["msize"] * m) / denom, {"exp_avg": m, "exp_avg_sq": v}
