"""AdamW and NAdamW arithmetic shared by the classes built on it (NAdamW, Muon's fallback).

Decoupled-decay Adam (Loshchilov & Hutter, 2019) with the optional Nesterov first moment of
NAdamW (Dozat, 2016; Table 1 of arXiv:1910.05446: the update uses ``lerp(m, g, 1 - beta1)``, the
moment one step ahead), the optional cautious mask (arXiv:2411.16085) and the optional
"corrected" decay ``lr^2 / max_lr`` (arXiv:2506.02285).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
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
    opt: Any = None,
) -> None:
    """One (N)AdamW step of ``views`` (state: ``step``, ``exp_avg``, ``exp_avg_sq``) through
    :func:`adam_like_rule` (``opt``: the optimizer, for ``GradScaler``)."""
    if not views:
        return
    wd_scale = lr if max_lr is None else lr * lr / max_lr
    scalars = [
        {"decay": 1.0 - wd_scale * weight_decay, "beta1": beta1, "beta2": beta2, "eps": eps,
         "size": lr / (1.0 - beta1**t), "bc2_sqrt": math.sqrt(1.0 - beta2**t), "numel": float(v.numel)}
        for v, t in zip(views, F.advance_steps(views))
    ]  # fmt: skip
    K.apply(opt, adam_like_rule, views, ("exp_avg", "exp_avg_sq"), scalars, ctx=ctx,
            sums=K.CAUTION_SUMS if caution else (), nesterov=nesterov, caution=caution,
            maximize=maximize, decay=weight_decay != 0.0)  # fmt: skip


def adam_like_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    nesterov: bool,
    caution: bool,
    maximize: bool,
    decay: bool,
    phase: str = "update",
) -> Any:
    """One tensor's (N)AdamW update::

    p <- p * (1 - s * wd)        (s = lr, or lr^2 / max_lr with max_lr)
    m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
    n  = beta1 m + (1 - beta1) g  if nesterov else m
    n <- n * cautious_mask(n, g)  if caution
    p <- p - lr / (1 - beta1^t) * n / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """  # fmt: skip
    if maximize:
        g = -g
    m = torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"])
    v = K.ema_sq(st["exp_avg_sq"], g, s["beta2"])
    n = torch.lerp(m, g, 1.0 - s["beta1"]) if nesterov else m
    if caution:
        if phase == "sums":
            return K.agreement(n, g)
        n = K.cautious(n, g, s)
    if decay:
        p = p * s["decay"]
    denom = v.sqrt() / s["bc2_sqrt"] + s["eps"]
    return p - (s["size"] * n) / denom, {"exp_avg": m, "exp_avg_sq": v}
