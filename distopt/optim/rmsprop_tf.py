"""RMSpropTF: RMSprop with TensorFlow's arithmetic (as used to train EfficientNet / MobileNet)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, flag, lr, nonneg, with_max_lr_snapshot

__all__ = ["RMSpropTF", "cautious"]


def cautious(ctx: StepContext, views: list[ParamView], updates: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    r"""Cautious masking (Liang et al., 2024) as new tensors, exact under sharding.

    ``u * mask / max(mean(mask), 1e-3)`` with ``mask = (u * g > 0)``: update components whose
    sign disagrees with the gradient are dropped and the rest rescaled by the inverse fraction
    kept.  The fraction is over the *whole* parameter: local counts are summed across shards in
    one reduction for all the parameters of ``views``.
    """
    if not updates:
        return []
    masks = torch._foreach_mul(updates, grads)
    masks = [(m > 0).to(u.dtype) for m, u in zip(masks, updates)]
    counts = [m.sum(dtype=torch.float32) for m in masks]
    (counts,) = ctx.reduce([counts], list(views))
    scales = [(c / max(v.numel, 1)).clamp(min=1e-3).reciprocal() for c, v in zip(counts, views)]
    torch._foreach_mul_(masks, scales)
    return torch._foreach_mul(updates, masks)


class RMSpropTF(DistOptimizer):
    r"""RMSprop with TensorFlow's conventions, options and defaults of timm's ``RMSpropTF``.

    Differences to ``torch.optim.RMSprop``: ``eps`` is added *inside* the square root, the
    running average ``square_avg`` starts at ones, and by default the learning rate is
    accumulated in the momentum buffer.  Update rule (element-wise, ``a = alpha``)::

        decay:  p <- p * (1 - s * wd)   if decoupled_decay    (s = lr, or lr^2 / max_lr if
                                                                corrected_weight_decay)
                g <- g + wd * p         otherwise (L2 penalty)
        v  <- v + (1 - a) * (g^2 - v)
        centered:  c <- c + (1 - a) * (g - c);  d = sqrt(v - c^2 + eps)
        otherwise: d = sqrt(v + eps)
        momentum > 0, lr_in_momentum:  b <- momentum * b + lr * g / d;  p <- p - b
        momentum > 0, otherwise:       b <- momentum * b + g / d;       p <- p - lr * b
        momentum == 0:                 p <- p - lr * g / d

    With ``caution`` (momentum > 0 only) the buffer entering the parameter update (not the
    stored one) is masked where its sign disagrees with the gradient and rescaled by the
    inverse fraction kept over the whole tensor (see :func:`cautious`; one batched reduction per
    step under sharding, the only communication this optimizer needs).

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-2).
        alpha: smoothing constant of the running averages (default 0.9).
        eps: term added inside the square root (default 1e-10).
        weight_decay: weight decay (default 0).
        momentum: momentum factor (default 0).
        centered: normalise by an estimate of the gradient's variance (default False).
        decoupled_decay: decay the weights directly instead of adding ``wd * p`` to the gradient
            (default False).
        corrected_weight_decay: with ``decoupled_decay``, scale the decay by ``lr^2 / max_lr``
            where ``max_lr`` is the constructor's lr (kept as ``max_lr_snapshot`` in the param
            groups) (default False).
        lr_in_momentum: accumulate the lr-scaled update in the momentum buffer, as TensorFlow does
            (default True).
        caution: cautious masking of the momentum update (default False).

    State per parameter: ``step`` (float32 scalar), ``square_avg`` (initialised to ones),
    ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered); fp32 for bf16/fp16 parameters.
    """

    elementwise = True  # unless caution=True (see needs_whole_tensors)

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        """Caution rescales by the fraction of agreeing signs over each whole tensor."""
        return bool(group.get("caution")) and group.get("momentum", 0.0) > 0

    hypers = HyperSpec(
        lr(1e-2),
        nonneg("alpha", 0.9, at_most=1.0),
        nonneg("eps", 1e-10),
        nonneg("weight_decay", 0.0),
        nonneg("momentum", 0.0),
        flag("centered", False),
        flag("decoupled_decay", False),
        flag("corrected_weight_decay", False),
        flag("lr_in_momentum", True),
        flag("caution", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    _zero_state = (("momentum_buffer", "momentum"), ("grad_avg", "centered"))

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        super()._init_state(group, view)
        view.state["square_avg"] = torch.ones_like(view.data, memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        wd, momentum, eps = group["weight_decay"], group["momentum"], group["eps"]
        one_minus_alpha = 1.0 - group["alpha"]
        params, grads, square_avgs = F.columns(views, "square_avg")
        F.advance_steps(views)

        if wd != 0.0:
            if group["decoupled_decay"]:
                scale = lr**2 / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
                torch._foreach_mul_(params, 1.0 - scale * wd)
            else:
                grads = F.l2_decay(grads, params, wd)

        torch._foreach_lerp_(square_avgs, torch._foreach_mul(grads, grads), one_minus_alpha)
        if group["centered"]:
            grad_avgs = [v.state["grad_avg"] for v in views]
            torch._foreach_lerp_(grad_avgs, grads, one_minus_alpha)
            denom = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1.0)
            torch._foreach_add_(denom, eps)
        else:
            denom = torch._foreach_add(square_avgs, eps)
        torch._foreach_sqrt_(denom)

        if momentum > 0:
            bufs = [v.state["momentum_buffer"] for v in views]
            torch._foreach_mul_(bufs, momentum)
            in_buf = group["lr_in_momentum"]
            torch._foreach_addcdiv_(bufs, grads, denom, value=lr if in_buf else 1.0)
            step = cautious(ctx, views, bufs, grads) if group["caution"] else bufs
            torch._foreach_add_(params, step, alpha=-1.0 if in_buf else -lr)
        else:
            torch._foreach_addcdiv_(params, grads, denom, value=-lr)
