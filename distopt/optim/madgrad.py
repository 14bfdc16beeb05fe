"""MADGRAD: momentumized, adaptive, dual averaged gradient method (Defazio & Jelassi, 2021)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, flag, lr, nonneg

__all__ = ["MADGRAD"]


class MADGRAD(DistOptimizer):
    r"""MADGRAD, with the options and defaults of timm's implementation (dense gradients).

    A dual-averaging method: the iterate is the starting point ``x0`` minus the weighted sum
    of all gradients ``s`` divided by the cube root of the weighted sum of their squares.
    Update rule for step ``k`` (element-wise; ``lam_k = (lr + eps) * sqrt(k)``, ``c = 1 - momentum``)::

        decay:  p <- p * (1 - lr * wd)   if decoupled_decay
                g <- g + wd * p          otherwise (L2 penalty)
        x0 = x0 (stored)                                  if momentum > 0
             p + s / (cbrt(nu) + eps)   (with the old s, nu)  if momentum == 0
        nu <- nu + lam_k * g^2
        s  <- s + lam_k * g
        z  = x0 - s / (cbrt(nu) + eps)
        p  <- (1 - c) * p + c * z        (p <- z when momentum == 0)

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-2).
        momentum: momentum in [0, 1) (default 0.9).
        weight_decay: weight decay (default 0).
        eps: term added to the cube root (default 1e-6); also added to lr in ``lam_k``, as in
            the reference implementation.
        decoupled_decay: decay the weights directly, as in AdamW (default False).

    State per parameter: ``step`` (float32 scalar), ``grad_sum_sq`` (``nu``), ``s`` and, with
    momentum, ``x0`` (a copy of the parameter at its first step); fp32 for bf16/fp16
    parameters.  Element-wise: exact under any sharding without communication.  Sparse
    gradients are not supported.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1e-2),
        nonneg("momentum", 0.9, below=1.0),
        nonneg("weight_decay", 0.0),
        nonneg("eps", 1e-6),
        flag("decoupled_decay", False),
    )

    _zero_state = ("grad_sum_sq", "s")

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        super()._init_state(group, view)
        if group["momentum"] != 0:
            view.state["x0"] = view.data.clone(memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        eps, wd, momentum = group["eps"], group["weight_decay"], group["momentum"]
        scalars = [
            {
                "lam": (lr + eps) * math.sqrt(t),
                "eps": eps,
                "wd": wd,
                "decay": 1.0 - lr * wd,
                "keep": 1.0 - momentum,
            }
            for t in F.advance_steps(views)
        ]
        states = ("grad_sum_sq", "s") + (("x0",) if momentum != 0 else ())
        K.apply(
            self,
            madgrad_rule,
            views,
            states,
            scalars,
            momentum=momentum != 0,
            decoupled=bool(group["decoupled_decay"]) and wd != 0.0,
            l2=not group["decoupled_decay"] and wd != 0.0,
        )


def madgrad_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    momentum: bool,
    decoupled: bool,
    l2: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MADGRAD's update of one tensor (see :class:`MADGRAD`; ``x0`` is read, never written)."""
    if decoupled:
        p = p * s["decay"]
    if l2:
        g = g + s["wd"] * p
    nu, total = st["grad_sum_sq"], st["s"]
    x0 = st["x0"] if momentum else p + total / (K.cbrt(nu) + s["eps"])
    nu = torch.addcmul(nu, s["lam"] * g, g)
    total = total + s["lam"] * g
    z = x0 - total / (K.cbrt(nu) + s["eps"])
    new_p = torch.lerp(p, z, s["keep"]) if momentum else z
    return new_p, {"grad_sum_sq": nu, "s": total}
