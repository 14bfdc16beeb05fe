"""Adadelta (Zeiler, 2012), torch.optim.Adadelta semantics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, flag, lr, nonneg

__all__ = ["Adadelta"]


class Adadelta(DistOptimizer):
    r"""Adadelta, with the options and defaults of ``torch.optim.Adadelta``.

    Update rule (element-wise)::

        g  <- -g if maximize
        g  <- g + weight_decay * p                       # L2 penalty
        v  <- rho * v + (1 - rho) * g^2
        d  = sqrt(u + eps) / sqrt(v + eps) * g
        u  <- rho * u + (1 - rho) * d^2
        p  <- p - lr * d

    Args:
        params: parameters or param groups.
        lr: coefficient that scales the delta (default 1.0).
        rho: coefficient of the running averages (default 0.9).
        eps: term added inside the square roots (default 1e-6).
        weight_decay: L2 penalty (default 0).
        maximize: maximize the objective instead of minimizing it (default False).

    State per parameter: ``step`` (float32 scalar), ``square_avg``, ``acc_delta`` (fp32 for
    bf16/fp16 parameters).  Element-wise: exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1.0),
        nonneg("rho", 0.9, at_most=1.0),
        nonneg("eps", 1e-6),
        nonneg("weight_decay", 0.0),
        KW_ONLY,
        flag("maximize", False),
    )

    _zero_state = ("square_avg", "acc_delta")

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        F.advance_steps(views)
        scalars = {"lr": float(group["lr"]), "rho": group["rho"], "eps": group["eps"],
                   "wd": group["weight_decay"]}  # fmt: skip
        K.apply(self, adadelta_rule, views, ("square_avg", "acc_delta"), scalars,
                maximize=bool(group["maximize"]), l2=group["weight_decay"] != 0.0)  # fmt: skip


def adadelta_rule(
    p: Tensor, g: Tensor, st: dict[str, Tensor], s: dict[str, Tensor], *, maximize: bool, l2: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Adadelta's update of one tensor (see :class:`Adadelta`).  ``a + c * b`` is written
    ``addcmul(a, b, c)``: rounded as the multi-tensor ``add_(b, alpha=c)`` (one fused
    multiply-add), so the eager form is torch's foreach Adadelta bit for bit."""
    if maximize:
        g = -g
    if l2:
        g = torch.addcmul(g, p, s["wd"])
    v = K.ema_sq(st["square_avg"], g, s["rho"])
    delta = (st["acc_delta"] + s["eps"]).sqrt() / (v + s["eps"]).sqrt() * g
    u = K.ema_sq(st["acc_delta"], delta, s["rho"])
    return torch.addcmul(p, delta, -s["lr"]), {"square_avg": v, "acc_delta": u}
