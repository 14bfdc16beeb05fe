"""ADOPT: Adam that converges with any beta2 (Taniguchi et al., 2024, arXiv:2411.02853), with
timm's options (decoupled decay, cautious mask)."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._cautious import cautious_masks
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, betas, flag, lr, nonneg, with_max_lr_snapshot

__all__ = ["Adopt"]


class Adopt(DistOptimizer):
    r"""ADOPT, with timm's options and defaults (names ``adopt``, ``adoptw``, ``cadopt``, ``cadoptw``).

    Update rule (element-wise; the cautious mask's mean is over the whole tensor).  ``g <- g +
    weight_decay * p`` first unless ``decoupled``.  Step 1 only initialises ``v = g^2``.  Then::

        p <- p * (1 - s * weight_decay)                         if decoupled (s = lr or lr^2 / max_lr)
        n  = g / max(sqrt(v), eps),  clipped to +-(t - 1)^clip_exp  (unless clip_exp is None)
        m <- beta1 m + (1 - beta1) n
        p <- p - lr * m   (m * cautious mask(m, g) if caution)
        v <- beta2 v + (1 - beta2) g^2

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: moment coefficients (default (0.9, 0.9999)).
        eps: floor of sqrt(v) (default 1e-6).
        clip_exp: exponent of the normalised-gradient clip; None disables (default 0.333).
        weight_decay: weight decay (default 0).
        decoupled: decoupled decay instead of L2 (default False).
        corrected_weight_decay: decoupled decay by ``lr^2 / max_lr`` (default False).
        caution: the cautious mask (default False).
        maximize: maximize the objective (default False).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    elementwise = True

    hypers = HyperSpec(
        lr(1e-3),
        betas((0.9, 0.9999)),
        nonneg("eps", 1e-6),
        nonneg("clip_exp", 0.333, optional=True),
        nonneg("weight_decay", 0.0),
        flag("decoupled", False),
        flag("corrected_weight_decay", False),
        KW_ONLY,
        flag("caution", False),
        flag("maximize", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        return bool(group["caution"])

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["exp_avg"] = self._zeros(view)
        view.state["exp_avg_sq"] = self._zeros(view)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd, decoupled = group["weight_decay"], group["decoupled"]
        steps = F.advance_steps(views)
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if wd != 0.0 and not decoupled:
            grads = F.l2_decay(grads, params, wd)
        first = [i for i, t in enumerate(steps) if t == 1.0]
        if first:  # the first step only initialises the second moment
            sq = [views[i].state["exp_avg_sq"] for i in first]
            torch._foreach_addcmul_(sq, [grads[i] for i in first], [grads[i] for i in first])
        rest = [i for i, t in enumerate(steps) if t != 1.0]
        if not rest:
            return
        vs = [views[i] for i in rest]
        ps = [params[i] for i in rest]
        gs = [grads[i] for i in rest]
        exp_avgs = [v.state["exp_avg"] for v in vs]
        sqs = [v.state["exp_avg_sq"] for v in vs]
        if wd != 0.0 and decoupled:
            s = lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
            torch._foreach_mul_(ps, 1.0 - s * wd)
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_clamp_min_(denom, group["eps"])
        normed = torch._foreach_div(gs, denom)
        if group["clip_exp"] is not None:
            for n, i in zip(normed, rest):
                c = (steps[i] - 1.0) ** group["clip_exp"]
                n.clamp_(-c, c)
        torch._foreach_lerp_(exp_avgs, normed, 1.0 - beta1)
        upd = exp_avgs
        if group["caution"]:
            upd = torch._foreach_mul(exp_avgs, cautious_masks(ctx, vs, exp_avgs, gs))
        torch._foreach_add_(ps, upd, alpha=-lr)
        F.ema_sq_(sqs, gs, beta2)
