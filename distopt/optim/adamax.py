"""Adamax: Adam with the infinity norm (Kingma & Ba, 2015, section 7), torch.optim semantics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
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
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

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
        scalars = [
            {
                "size": lr / (1.0 - beta1**t),
                "beta1": beta1,
                "beta2": beta2,
                "eps": group["eps"],
                "wd": group["weight_decay"],
            }
            for t in F.advance_steps(views)
        ]
        K.apply(
            self,
            adamax_rule,
            views,
            ("exp_avg", "exp_inf"),
            scalars,
            maximize=bool(group["maximize"]),
            l2=group["weight_decay"] != 0.0,
        )


def adamax_rule(
    p: Tensor, g: Tensor, st: dict[str, Tensor], s: dict[str, Tensor], *, maximize: bool, l2: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Adamax's update of one tensor (see :class:`Adamax`)."""
    g = K.gradient_in(g, p, s["wd"] if l2 else None, maximize)
    m = torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"])
    u = torch.maximum(st["exp_inf"] * s["beta2"], g.abs() + s["eps"])
    return p - (s["size"] * m) / u, {"exp_avg": m, "exp_inf": u}
