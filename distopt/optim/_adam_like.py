"""AdamW and NAdamW arithmetic shared by the classes built on it (NAdamW, Muon's fallback).

Decoupled-decay Adam (Loshchilov & Hutter, 2019) with the optional Nesterov first moment of
NAdamW (Dozat, 2016; Table 1 of arXiv:1910.05446: the update uses ``lerp(m, g, 1 - beta1)``, the
moment one step ahead), the optional cautious mask (arXiv:2411.16085) and the optional
"corrected" decay ``lr^2 / max_lr`` (arXiv:2506.02285).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distopt.optim import _functional as F
from distopt.optim._cautious import cautious_masks
from distopt.optim._core import ParamView, StepContext


def adam_like_update_(
    ctx: StepContext,
    views: Sequence[ParamView],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    nesterov: bool = False,
    caution: bool = False,
    max_lr: float | None = None,
    maximize: bool = False,
) -> None:
    """One (N)AdamW step of ``views`` (state: ``step``, ``exp_avg``, ``exp_avg_sq``)::

    p <- p * (1 - s * wd)        (s = lr, or lr^2 / max_lr with max_lr)
    m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
    n  = beta1 m + (1 - beta1) g  if nesterov else m
    n <- n * cautious_mask(n, g)  if caution
    p <- p - lr / (1 - beta1^t) * n / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    if not views:
        return
    params = [v.data for v in views]
    grads = [v.grad for v in views]
    if maximize:
        grads = torch._foreach_neg(grads)
    exp_avgs = [v.state["exp_avg"] for v in views]
    exp_avg_sqs = [v.state["exp_avg_sq"] for v in views]
    steps = F.advance_steps(views)
    wd_scale = lr if max_lr is None else lr * lr / max_lr
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - wd_scale * weight_decay)
    F.ema_(exp_avgs, grads, beta1)
    F.ema_sq_(exp_avg_sqs, grads, beta2)
    num = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1) if nesterov else exp_avgs
    denom = F.adam_denominator(exp_avg_sqs, F.bias_correction(beta2, steps), eps)
    if caution:
        num = torch._foreach_mul(num, cautious_masks(ctx, views, num, grads))
    torch._foreach_addcdiv_(params, num, denom, [-lr / b for b in F.bias_correction(beta1, steps)])
