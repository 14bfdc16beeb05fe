"""LAMB: layer-wise adaptive moments for large-batch training (You et al., 2020), with timm's
cautious (arXiv:2411.16085) and corrected-decay (arXiv:2506.02285) options."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._cautious import cautious_masks
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import (
    HyperSpec,
    betas,
    check_clip,
    flag,
    lr,
    nonneg,
    option,
    with_max_lr_snapshot,
)


class Lamb(DistOptimizer):
    r"""LAMB, with the options of timm's implementation.

    Update rule for step ``t`` (per parameter tensor ``p``; norms are over the whole tensor)::

        c  = max(1, ||all grads|| / max_grad_norm)       # global clip, all param groups together
        g  = grad / c
        m  <- beta1 * m + beta3 * g      (beta3 = 1 - beta1 if grad_averaging else 1)
        v  <- beta2 * v + (1 - beta2) * g^2
        u  = (m / bc1) / (sqrt(v / bc2) + eps)           (bc = 1 - beta^t, or 1 without bias_correction)
        u  <- u * 1[u * g > 0] / max(mean, 1e-3)          (the cautious mask, if caution)
        u  <- u + weight_decay * p                        (or p <- p * (1 - s * wd) if decoupled_decay,
                                                           s = lr, or lr^2 / max_lr if corrected_weight_decay)
        r  = ||p|| / ||u||  (1 if a norm is 0; min(r, 1) if trust_clip)
             applied only when weight_decay != 0 or always_adapt
        p  <- p - lr * r * u

    Under ZeRO or FSDP2 the norms ``||p||`` and ``||u||`` of every parameter are computed from
    local partial sums in one batched all-reduce, the global clip norm in another and the
    cautious mask's mean (with ``caution``) in a third, so the result equals single-process
    training.  ``max_lr`` is the constructor's lr (``max_lr_snapshot`` in the groups); the
    corrected decay applies to the decoupled decay only, as in timm.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        bias_correction: apply Adam's bias corrections (default True).
        betas: running-average coefficients (default (0.9, 0.999)).
        eps: denominator term (default 1e-6).
        weight_decay: weight decay (default 0.01).
        grad_averaging: scale the gradient by ``1 - beta1`` in the first moment (default True).
        max_grad_norm: global gradient-norm clip over all parameters; None disables (default 1.0).
        trust_clip: clip the trust ratio at 1 (LAMBC) (default False).
        always_adapt: apply the trust ratio even without weight decay (default False).
        caution: the cautious mask, see above (default False).
        decoupled_decay: decay the weights directly instead of adding ``wd * p`` to the update
            (default False).
        corrected_weight_decay: with ``decoupled_decay``, decay by ``lr^2 / max_lr`` (default False).
    """

    hypers = HyperSpec(
        lr(1e-3),
        flag("bias_correction", True),
        betas((0.9, 0.999)),
        nonneg("eps", 1e-6),
        nonneg("weight_decay", 0.01),
        flag("grad_averaging", True),
        option("max_grad_norm", 1.0, "float | None", check_clip),
        flag("trust_clip", False),
        flag("always_adapt", False),
        flag("caution", False),
        flag("decoupled_decay", False),
        flag("corrected_weight_decay", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    _zero_state = ("exp_avg", "exp_avg_sq")

    def _step_groups(self, groups: list[tuple[dict[str, Any], list[ParamView]]], ctx: StepContext) -> None:
        # The clip norm spans every parameter of every group (as in timm), so it is computed
        # before any group is updated: one reduction for the whole optimizer.
        max_norm = self.defaults["max_grad_norm"]
        ctx.extra["clip"] = None
        all_views = [v for _, vs in groups for v in vs]
        if max_norm is not None and all_views:
            norm = F.global_grad_norm(ctx, all_views)
            # a device tensor (no host read); 1 where there is nothing to clip
            ctx.extra["clip"] = torch.clamp(norm / max_norm, min=1.0)
        super()._step_groups(groups, ctx)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
        steps = F.advance_steps(views)
        if group["bias_correction"]:
            bc1, bc2 = F.bias_correction(beta1, steps), F.bias_correction(beta2, steps)
        else:
            bc1 = bc2 = [1.0] * len(views)
        params, grads = F.columns(views)
        clip = ctx.extra.get("clip")
        if clip is not None:
            grads = F.scaled(grads, (1.0 / clip).to(grads[0].device))
        exp_avgs = [v.state["exp_avg"] for v in views]
        F.ema_(exp_avgs, grads, beta1, beta3)
        F.ema_sq_([v.state["exp_avg_sq"] for v in views], grads, beta2)
        denom = F.adam_denominator([v.state["exp_avg_sq"] for v in views], bc2, group["eps"])
        updates = torch._foreach_div(exp_avgs, denom)
        torch._foreach_div_(updates, bc1)
        if group.get("caution"):
            torch._foreach_mul_(updates, cautious_masks(ctx, views, updates, grads))
        if wd != 0.0:
            if group["decoupled_decay"]:
                corrected = group.get("corrected_weight_decay")
                scale = lr * lr / group["max_lr_snapshot"] if corrected else lr
                F.decoupled_decay_(params, scale, wd)
            else:
                torch._foreach_add_(updates, params, alpha=wd)
        if wd != 0.0 or group["always_adapt"]:
            w_norms, u_norms = F.global_norms(ctx, views, params, updates)
            ratios = [F.trust_ratio(w, u, group["trust_clip"]) for w, u in zip(w_norms, u_norms)]
            torch._foreach_mul_(updates, ratios)
        torch._foreach_add_(params, updates, alpha=-lr)
