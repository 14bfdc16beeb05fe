"""RAdam: Adam with a rectified adaptive learning rate (Liu et al., 2020).

Also home of :func:`rectification`, the step-count-only scalar of the rectified update that
AdaBelief's ``rectify`` option shares.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, adam_hypers, flag

__all__ = ["RAdam", "rectification"]

#: below this length of the approximated simple moving average the variance of the adaptive
#: learning rate is considered intractable and the update falls back to (momentum) SGD.
SMA_THRESHOLD = 5.0


def rectification(beta1: float, beta2: float, step: float) -> tuple[float, float | None]:
    r"""``(rho_t, r_t / (1 - beta1^t))`` for step ``t`` of a rectified Adam update.

    ``rho_inf = 2 / (1 - beta2) - 1`` and ``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)`` is
    the length of the simple moving average that approximates the exponential one.  When
    ``rho_t >= 5`` the rectification term is::

        r_t = sqrt((1 - beta2^t) (rho_t - 4) (rho_t - 2) rho_inf / ((rho_inf - 4) (rho_inf - 2) rho_t))

    (with the ``1 - beta2^t`` second-moment bias correction folded in) and the second value is
    ``r_t / (1 - beta1^t)``; otherwise it is None: the adaptive step is not used.  The result
    depends on the step count only, so it is the same on every shard of a parameter.
    """
    beta2_t = beta2**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    if rho_t < SMA_THRESHOLD:
        return rho_t, None
    r = math.sqrt(
        (1.0 - beta2_t)
        * (rho_t - 4.0) / (rho_inf - 4.0)
        * (rho_t - 2.0) / rho_t
        * rho_inf / (rho_inf - 2.0)
    )  # fmt: skip
    return rho_t, r / (1.0 - beta1**step)


class RAdam(DistOptimizer):
    r"""RAdam with the semantics and defaults of timm's ``RAdamLegacy``.

    Update rule for step ``t`` (``g`` the gradient, all operations element-wise)::

        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        p  <- p * (1 - lr * weight_decay)                      # decoupled decay
        if rho_t >= 5:   p <- p - lr * r_t / (1 - beta1^t) * m / (sqrt(v) + eps)
        else:            p <- p - lr / (1 - beta1^t) * m       # SGD with momentum while the
                                                               # variance is intractable

    with ``rho_t`` and ``r_t`` from :func:`rectification`.  Note that ``eps`` is added to
    ``sqrt(v)`` *without* the second-moment bias correction (that correction is inside
    ``r_t``), as in the original implementation.  ``weight_decay`` decays the weights directly
    (scaled by ``lr``) rather than being added to the gradient; with
    ``decoupled_weight_decay=False`` it is added to the gradient instead (``g <- g + wd * p``
    before the moments), as ``torch.optim.RAdam`` does by default.  timm's ``radamw`` is
    ``torch.optim.RAdam(decoupled_weight_decay=True)``: this class's default arithmetic.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the running averages (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8).
        weight_decay: weight decay (default 0).
        decoupled_weight_decay: decay the weights directly (default True, as timm's RAdamLegacy);
            False adds ``wd * p`` to the gradient (torch.optim.RAdam's default).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq`` (fp32 for
    bf16/fp16 parameters).  Element-wise: exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        *adam_hypers(1e-3),
        KW_ONLY,
        flag("decoupled_weight_decay", True),
    )

    _zero_state = ("exp_avg", "exp_avg_sq")

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        decoupled = group.get("decoupled_weight_decay", True)  # absent in older checkpoints
        scalars = []
        for t in F.advance_steps(views):
            rect = rectification(beta1, beta2, t)[1]
            scalars.append({
                "beta1": beta1, "beta2": beta2, "eps": group["eps"], "wd": wd,
                "decay": 1.0 - lr * wd, "adaptive": 0.0 if rect is None else 1.0,
                "size": -lr / (1.0 - beta1**t) if rect is None else -lr * rect,
            })  # fmt: skip
        K.apply(
            self,
            radam_rule,
            views,
            ("exp_avg", "exp_avg_sq"),
            scalars,
            decoupled=bool(decoupled),
            decay=wd != 0.0,
        )


def radam_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    decoupled: bool,
    decay: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RAdam's update of one tensor (see :class:`RAdam`): ``s["size"]`` is this step's (negative)
    step size, ``-lr * r_t / (1 - beta1^t)`` when ``s["adaptive"]`` (``rho_t >= 5``) and
    ``-lr / (1 - beta1^t)`` otherwise."""
    if decay and not decoupled:
        g = g + s["wd"] * p
    v = K.ema_sq(st["exp_avg_sq"], g, s["beta2"])
    m = torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"])
    if decay and decoupled:
        p = p * s["decay"]
    adaptive = p + (s["size"] * m) / (v.sqrt() + s["eps"])
    new_p = torch.where(s["adaptive"] > 0, adaptive, p + m * s["size"])
    return new_p, {"exp_avg": m, "exp_avg_sq": v}
