"""Adam and AdamW (Kingma & Ba, 2015; Loshchilov & Hutter, 2019): one implementation.

:class:`Adam` (torch.optim.Adam semantics: L2 decay coupled to the gradient, or decoupled on
request) and :class:`~distopt.optim.AdamW` (decoupled decay, plus the legacy transformers
arithmetic) declare their own hyperparameters and share :class:`AdamFamily`'s state and update.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext, fused_steps
from distopt.optim._hyper import KW_ONLY, HyperSpec, adam_hypers, flag

__all__ = ["Adam", "AdamFamily", "adam_rule", "adam_update"]


class AdamFamily(DistOptimizer):
    """State and update shared by :class:`Adam` and :class:`~distopt.optim.AdamW`.

    A subclass says through :meth:`_arithmetic` which variant a param group runs: whether the
    decay is decoupled, whether Adam's bias corrections apply, and whether the legacy
    transformers order (``eps`` added to ``sqrt(v)`` before the bias correction; decay after
    the update) is used.  State per parameter: ``step`` (float32 scalar), ``exp_avg``,
    ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``.  The default arithmetic on one
    fp32/fp64 CPU/CUDA dtype runs in torch's fused kernel (``torch._fused_adam(w)_``); every
    other variant runs :func:`adam_rule` in one pass (:mod:`distopt.optim._kernel`).
    """

    elementwise = True  # never calls the reducer (see DistOptimizer.needs_whole_tensors)

    def _arithmetic(self, group: dict[str, Any]) -> tuple[bool, bool, bool]:  # pragma: no cover
        """``(decoupled, correct_bias, transformers_order)`` of ``group``."""
        raise NotImplementedError

    _zero_state = ("exp_avg", "exp_avg_sq", ("max_exp_avg_sq", "amsgrad"))

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        decoupled, correct_bias, transformers_order = self._arithmetic(group)
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        amsgrad, maximize = group["amsgrad"], group["maximize"]
        params, grads, exp_avgs, exp_avg_sqs = F.columns(views, "exp_avg", "exp_avg_sq")
        max_sqs = [v.state["max_exp_avg_sq"] for v in views] if amsgrad else []

        if correct_bias and not transformers_order and F.fused_adam_ok(params):
            # on the parameters' device, as torch's fused path keeps them
            steps = fused_steps(views)
            torch._foreach_add_(steps, 1.0)
            fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
            fused(
                params, list(grads), exp_avgs, exp_avg_sqs, max_sqs, steps,
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps,
                amsgrad=amsgrad, maximize=maximize,
            )  # fmt: skip
            return

        adam_update(self, ctx, group, views, decoupled=decoupled, correct_bias=correct_bias,
                    transformers_order=transformers_order)  # fmt: skip


def adam_update(
    opt: DistOptimizer,
    ctx: StepContext,
    group: dict[str, Any],
    views: list[ParamView],
    *,
    decoupled: bool,
    correct_bias: bool = True,
    transformers_order: bool = False,
    decay_lr: float | None = None,
    caution: bool = False,
) -> None:
    """One Adam / AdamW step of ``views`` through :func:`adam_rule` (every variant that does not
    run in torch's fused kernel).  ``decay_lr``: the lr the decoupled decay is scaled by (default
    the group's lr; AdamW's corrected decay passes ``lr^2 / max_lr``)."""
    if not views:
        return
    lr = float(group["lr"])
    beta1, beta2 = group["betas"]
    wd = group["weight_decay"]
    scale = lr if decay_lr is None else decay_lr
    scalars = []
    for v, t in zip(views, F.advance_steps(views)):
        bc1, bc2 = (1.0 - beta1**t, 1.0 - beta2**t) if correct_bias else (1.0, 1.0)
        scalars.append({
            "wd": wd, "decay": 1.0 - scale * wd, "beta1": beta1, "beta2": beta2, "eps": group["eps"],
            "size": -lr * (bc2**0.5) / bc1 if transformers_order else -lr / bc1,
            "bc2_sqrt": math.sqrt(bc2), "numel": float(v.numel),
        })  # fmt: skip
    amsgrad = bool(group["amsgrad"])
    states = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    K.apply(opt, adam_rule, views, states, scalars, ctx=ctx if caution else None,
            sums=K.CAUTION_SUMS if caution else (), maximize=bool(group["maximize"]),
            l2=not decoupled and wd != 0.0, decay=decoupled and wd != 0.0, amsgrad=amsgrad,
            caution=caution, transformers_order=transformers_order)  # fmt: skip


def adam_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    maximize: bool,
    l2: bool,
    decay: bool,
    amsgrad: bool,
    caution: bool,
    transformers_order: bool,
    phase: str = "update",
) -> Any:
    """One tensor's Adam / AdamW update (see :class:`Adam`, :class:`~distopt.optim.AdamW`).

    ``s["size"]``: the negative step size (``-lr / (1 - beta1^t)``, or with
    ``transformers_order`` ``-lr sqrt(1 - beta2^t) / (1 - beta1^t)`` and ``eps`` added before the
    correction); ``s["decay"]``: the decoupled decay factor, applied before the update (after
    it with ``transformers_order``); ``l2``: ``wd * p`` added to the gradient.  Rounded as the
    multi-tensor code was (``addcmul`` for ``add_(alpha=)``, ``(c * m) / d`` for ``addcdiv``).
    """
    if maximize:
        g = -g
    if l2:
        g = torch.addcmul(g, p, s["wd"])
    elif decay and not transformers_order:
        p = p * s["decay"]
    m = torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"])
    v = K.ema_sq(st["exp_avg_sq"], g, s["beta2"])
    new = {"exp_avg": m, "exp_avg_sq": v}
    if amsgrad:
        v = new["max_exp_avg_sq"] = torch.maximum(st["max_exp_avg_sq"], v)
    n = m
    if caution:
        if phase == "sums":
            return K.agreement(m, g)
        n = K.cautious(m, g, s)
    if transformers_order:
        p = p + (s["size"] * n) / (v.sqrt() + s["eps"])
        return (p * s["decay"] if decay else p), new
    return p + (s["size"] * n) / (v.sqrt() / s["bc2_sqrt"] + s["eps"]), new


class Adam(AdamFamily):
    r"""Adam, with the options and defaults of ``torch.optim.Adam``.

    Update rule for step ``t`` (element-wise)::

        g  <- -g if maximize
        g  <- g + weight_decay * p          (p <- p * (1 - lr * wd) if decoupled_weight_decay)
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        v' <- max(v', v)  if amsgrad else v
        p  <- p - lr / (1 - beta1^t) * m / (sqrt(v' / (1 - beta2^t)) + eps)

    Unlike :class:`~distopt.optim.AdamW`, the weight decay is by default an L2 penalty added to
    the gradient, so it passes through the adaptive normalisation.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the running averages (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8).
        weight_decay: L2 penalty (default 0).
        amsgrad: use the AMSGrad maximum of the second moment (default False).
        maximize: maximize the objective instead of minimizing it (default False).
        decoupled_weight_decay: decay the weights directly, making this AdamW (default False).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq`` (fp32 for bf16/fp16 parameters).  When all local tensors share a
    floating dtype and a CPU/CUDA device the update runs in torch's fused multi-tensor kernel.
    Element-wise: exact under any sharding without communication.
    """

    hypers = HyperSpec(
        *adam_hypers(1e-3),
        flag("amsgrad", False),
        KW_ONLY,
        flag("maximize", False),
        flag("decoupled_weight_decay", False),
    )

    def _arithmetic(self, group: dict[str, Any]) -> tuple[bool, bool, bool]:
        return bool(group["decoupled_weight_decay"]), True, False
