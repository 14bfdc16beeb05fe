"""Adagrad (Duchi et al., 2011), torch.optim.Adagrad semantics (dense gradients)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, flag, lr, nonneg

__all__ = ["Adagrad"]


class Adagrad(DistOptimizer):
    r"""Adagrad, with the options and defaults of ``torch.optim.Adagrad``.

    Update rule for step ``t`` (element-wise)::

        g  <- -g if maximize
        g  <- g + weight_decay * p                       # L2 penalty
        s  <- s + g^2                                    (s starts at initial_accumulator_value)
        p  <- p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-2).
        lr_decay: learning-rate decay (default 0).
        weight_decay: L2 penalty (default 0).
        initial_accumulator_value: starting value of the sum of squares (default 0).
        eps: term added to the denominator (default 1e-10).
        maximize: maximize the objective instead of minimizing it (default False).

    State per parameter: ``step`` (float32 scalar), ``sum`` (fp32 for bf16/fp16 parameters).
    Element-wise: exact under any sharding without communication.  Unlike torch, sparse
    gradients are not supported.
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1e-2),
        nonneg("lr_decay", 0.0),
        nonneg("weight_decay", 0.0),
        nonneg("initial_accumulator_value", 0.0),
        nonneg("eps", 1e-10),
        KW_ONLY,
        flag("maximize", False),
    )

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["sum"] = torch.full_like(
            view.data, group["initial_accumulator_value"], memory_format=torch.preserve_format
        )

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        scalars = [{"size": lr / (1.0 + (t - 1.0) * group["lr_decay"]), "eps": group["eps"],
                    "wd": group["weight_decay"]} for t in F.advance_steps(views)]  # fmt: skip
        K.apply(
            self,
            adagrad_rule,
            views,
            ("sum",),
            scalars,
            maximize=bool(group["maximize"]),
            l2=group["weight_decay"] != 0.0,
        )


def adagrad_rule(
    p: Tensor, g: Tensor, st: dict[str, Tensor], s: dict[str, Tensor], *, maximize: bool, l2: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Adagrad's update of one tensor (see :class:`Adagrad`)."""
    g = K.gradient_in(g, p, s["wd"] if l2 else None, maximize)
    total = st["sum"] + g * g
    return p - (s["size"] * g) / (total.sqrt() + s["eps"]), {"sum": total}
