"""RMSprop (Hinton; centered: Graves, 2013), torch.optim.RMSprop semantics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, flag, lr, nonneg

__all__ = ["RMSprop"]


class RMSprop(DistOptimizer):
    r"""RMSprop, with the options and defaults of ``torch.optim.RMSprop``.

    (For TensorFlow's arithmetic, as in timm's EfficientNet recipes, see
    :class:`~distopt.optim.RMSpropTF`.)  Update rule (element-wise, ``a = alpha``)::

        g  <- -g if maximize
        g  <- g + weight_decay * p                       # L2 penalty
        v  <- a * v + (1 - a) * g^2
        centered:  c <- a * c + (1 - a) * g;  d = sqrt(v - c^2) + eps
        otherwise: d = sqrt(v) + eps
        momentum > 0:  b <- momentum * b + g / d;  p <- p - lr * b
        otherwise:     p <- p - lr * g / d

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-2).
        alpha: smoothing constant (default 0.99).
        eps: term added to the denominator (default 1e-8).
        weight_decay: L2 penalty (default 0).
        momentum: momentum factor (default 0).
        centered: normalise by an estimate of the gradient's variance (default False).
        maximize: maximize the objective instead of minimizing it (default False).

    State per parameter: ``step`` (float32 scalar), ``square_avg``, ``momentum_buffer``
    (momentum > 0), ``grad_avg`` (centered); fp32 for bf16/fp16 parameters.  Element-wise:
    exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1e-2),
        nonneg("alpha", 0.99),
        nonneg("eps", 1e-8),
        nonneg("weight_decay", 0.0),
        nonneg("momentum", 0.0),
        flag("centered", False),
        KW_ONLY,
        flag("maximize", False),
    )

    _zero_state = ("square_avg", ("momentum_buffer", "momentum"), ("grad_avg", "centered"))

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        F.advance_steps(views)
        momentum = group["momentum"]
        scalars = {"lr": float(group["lr"]), "alpha": group["alpha"], "eps": group["eps"],
                   "momentum": momentum, "wd": group["weight_decay"]}  # fmt: skip
        states = ("square_avg",) + (("momentum_buffer",) if momentum > 0 else ())
        states += ("grad_avg",) if group["centered"] else ()
        K.apply(
            self,
            rmsprop_rule,
            views,
            states,
            scalars,
            maximize=bool(group["maximize"]),
            l2=group["weight_decay"] != 0.0,
            momentum=momentum > 0,
            centered=bool(group["centered"]),
        )


def rmsprop_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    maximize: bool,
    l2: bool,
    momentum: bool,
    centered: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RMSprop's update of one tensor (see :class:`RMSprop`)."""  # fmt: skip
    g = K.gradient_in(g, p, s["wd"] if l2 else None, maximize)
    sq = K.ema_sq(st["square_avg"], g, s["alpha"])
    new = {"square_avg": sq}
    if centered:
        ga = torch.lerp(st["grad_avg"], g, 1.0 - s["alpha"])
        new["grad_avg"] = ga
        denom = (sq - ga * ga).sqrt() + s["eps"]
    else:
        denom = sq.sqrt() + s["eps"]
    if not momentum:
        return p - (s["lr"] * g) / denom, new
    b = st["momentum_buffer"] * s["momentum"] + g / denom
    new["momentum_buffer"] = b
    return torch.addcmul(p, b, -s["lr"]), new
