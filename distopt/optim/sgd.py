"""SGD with momentum, dampening and Nesterov momentum (torch.optim.SGD semantics)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, check_nesterov, flag, lr, nonneg

__all__ = ["SGD"]


class SGD(DistOptimizer):
    r"""Stochastic gradient descent, with the options and defaults of ``torch.optim.SGD``.

    Update rule (element-wise)::

        g  <- -g if maximize
        g  <- g + weight_decay * p                       # L2 penalty
        b  <- g                                          # at the buffer's first step
        b  <- momentum * b + (1 - dampening) * g         # afterwards
        d  = g + momentum * b  if nesterov  else  b      (d = g when momentum == 0)
        p  <- p - lr * d

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        momentum: momentum factor (default 0).
        dampening: dampening of the momentum (default 0).
        weight_decay: L2 penalty (default 0).
        nesterov: Nesterov momentum; needs momentum > 0 and dampening 0 (default False).
        maximize: maximize the objective instead of minimizing it (default False).

    State per parameter (momentum != 0 only): ``momentum_buffer``, created from the gradient at
    the parameter's first step with momentum, as torch does (fp32 for bf16/fp16 parameters).
    Element-wise: exact under any sharding without communication.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1e-3),
        nonneg("momentum", 0.0),
        nonneg("dampening", 0.0),
        nonneg("weight_decay", 0.0),
        flag("nesterov", False),
        KW_ONLY,
        flag("maximize", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        check_nesterov(hypers)
        return params, hypers

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        # The momentum buffer starts as the first gradient (torch semantics): created here as
        # zeros, it takes the gradient in the rule at its first step (``s["first"]``).
        pass

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        sgd_update(self, ctx, group, views, decay=1.0, l2=group["weight_decay"], caution=False)


def sgd_update(
    opt: DistOptimizer,
    ctx: StepContext,
    group: dict[str, Any],
    views: list[ParamView],
    *,
    decay: float,
    l2: float,
    caution: bool,
) -> None:
    """One SGD / SGDW step of ``views`` through :func:`sgd_rule` (creates the momentum buffers)."""
    if not views:
        return
    momentum = group["momentum"]
    scalars = []
    for v in views:
        first = momentum != 0 and "momentum_buffer" not in v.state
        if first:
            v.state["momentum_buffer"] = torch.zeros_like(
                v.data, memory_format=torch.preserve_format
            )
        scalars.append(
            {
                "lr": float(group["lr"]),
                "decay": decay,
                "l2": l2,
                "momentum": momentum,
                "dampening": group["dampening"],
                "first": float(first),
                "numel": float(v.numel),
            }
        )
    K.apply(opt, sgd_rule, views, ("momentum_buffer",) if momentum != 0 else (), scalars,
            ctx=ctx if caution else None, sums=("agree",) if caution else (),
            maximize=bool(group["maximize"]), momentum=momentum != 0, nesterov=bool(group["nesterov"]),
            l2=l2 != 0.0, caution=caution)  # fmt: skip


def sgd_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    maximize: bool,
    momentum: bool,
    nesterov: bool,
    l2: bool,
    caution: bool,
    phase: str = "update",
) -> Any:
    """SGD's update of one tensor (:class:`SGD`, and :class:`~distopt.optim.SGDW`'s decoupled
    decay ``s["decay"]`` and cautious mask)."""  # fmt: skip
    g = K.gradient_in(g, p, s["l2"] if l2 else None, maximize)
    new = {}
    d = g
    if momentum:
        b = torch.where(
            s["first"] > 0, g, st["momentum_buffer"] * s["momentum"] + (1.0 - s["dampening"]) * g
        )
        new["momentum_buffer"] = b
        d = g + s["momentum"] * b if nesterov else b
    if caution:
        mask = (d * g > 0).to(d.dtype)
        if phase == "sums":
            return {"agree": mask}
        d = d * (mask / torch.clamp(s["agree"] / s["numel"], min=1e-3))
    return p * s["decay"] - s["lr"] * d, new
