"""LAMB: layer-wise adaptive moments for large-batch training (You et al., 2020), with timm's
cautious (arXiv:2411.16085) and corrected-decay (arXiv:2506.02285) options."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
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
from distopt.optim._rule_trust import (
    grad_divided,
    grad_norm,
    inv_grad_scale,
    once,
    trust_ratio,
)

__all__ = ["Lamb", "lamb_rule"]

#: the key under which phase "sums" leaves ``(m, v, u)`` in ``st`` for phase "update" (see
#: :func:`lamb_rule`)
_SHARED = "_lamb_m_v_u"


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

    Under ZeRO or FSDP2 the sums of squares behind ``||p||`` and ``||u||`` (and, with
    ``caution``, the mask's count) of every parameter are local partial sums added across ranks
    in one batched all-reduce, the global clip norm in another, so the result equals
    single-process training.  ``max_lr`` is the constructor's lr (``max_lr_snapshot`` in the
    groups); the corrected decay applies to the decoupled decay only, as in timm.

    The step is :func:`lamb_rule` run by :func:`distopt.optim._kernel.apply`: one read of the
    gradients for the clip norm, one pass for the whole-tensor sums, one fused update; the clip
    factor (a device tensor) divides the gradient inside both kernels.

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

    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

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

    def _step_groups(
        self, groups: list[tuple[dict[str, Any], list[ParamView]]], ctx: StepContext
    ) -> None:
        # The clip norm spans every parameter of every group (as in timm), so it is computed
        # before any group is updated: one reduction for the whole optimizer.
        max_norm = self.defaults["max_grad_norm"]
        ctx.extra["clip"] = None
        all_views = [v for _, vs in groups for v in vs]
        if max_norm is not None and all_views:
            norm = grad_norm(ctx, all_views)
            inv = inv_grad_scale(self, norm.device)
            if inv is not None:  # GradScaler's scaled gradients: the norm of the true ones
                norm = norm * inv
            # a device tensor (no host read); 1 where there is nothing to clip
            ctx.extra["clip"] = torch.clamp(norm / max_norm, min=1.0)
        super()._step_groups(groups, ctx)

    @staticmethod
    def _scalars(group: dict[str, Any], t: float, decay: float) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        bc1, bc2 = (1.0 - beta1**t, 1.0 - beta2**t) if group["bias_correction"] else (1.0, 1.0)
        # (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) = m / (sqrt(v) * k1 + k2): one division
        # per element instead of three (a compiled rule divides per element, vector by vector)
        return {"lr": float(group["lr"]), "beta1": beta1, "beta3": 1.0 - beta1, "beta2": beta2,
                "wd": group["weight_decay"], "decay": decay, "k1": bc1 / math.sqrt(bc2),
                "k2": bc1 * group["eps"]}  # fmt: skip

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr, wd = float(group["lr"]), group["weight_decay"]
        caution, decoupled = bool(group.get("caution")), bool(group["decoupled_decay"])
        adapt = wd != 0.0 or bool(group["always_adapt"])
        if decoupled and group.get("corrected_weight_decay"):
            decay = 1.0 - lr * lr / group["max_lr_snapshot"] * wd
        else:
            decay = 1.0 - lr * wd
        scalars, per_step = [], {}  # one scalar set per distinct step count (usually one)
        for v, t in zip(views, F.advance_steps(views)):
            sc = per_step.get(t)
            if sc is None:
                sc = per_step[t] = self._scalars(group, t, decay)
            scalars.append({**sc, "numel": float(v.numel)} if caution else sc)
        sums: tuple[str, ...] = ()
        if adapt:
            sums = ("p_sq", "u_sq")
            if caution:
                sums = ("agree", "p_sq", "um_sq") + (
                    ("um_p",) if wd != 0.0 and not decoupled else ()
                )
        elif caution:
            sums = K.CAUTION_SUMS
        K.apply(
            grad_divided(self, ctx.extra.get("clip")),
            lamb_rule,
            views,
            ("exp_avg", "exp_avg_sq"),
            scalars,
            ctx=ctx if sums else None,
            sums=sums,
            averaging=bool(group["grad_averaging"]),
            caution=caution,
            decay=("decoupled" if decoupled else "l2") if wd != 0.0 else "none",
            adapt=adapt,
            trust_clip=bool(group["trust_clip"]),
        )


def lamb_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    averaging: bool,
    caution: bool,
    decay: str,
    adapt: bool,
    trust_clip: bool,
    phase: str = "update",
) -> Any:
    """Lamb's update of one tensor (see :class:`Lamb`; ``g`` arrives divided by the clip factor).

    Whole-tensor sums (``phase="sums"``): ``p_sq`` (of the decayed ``p``) and ``u_sq`` for the
    trust ratio; with ``caution``, the mask count ``agree`` and the masked update's ``um_sq``
    and ``um_p`` instead of ``u_sq``: the mask's scale is known only after the sums, and
    ``||u m / c + wd p||^2 = um_sq / c^2 + 2 wd um_p / c + wd^2 p_sq``.
    """
    # Compute once: phase "sums" leaves (m, v, u) in ``st``.  When both phases run in one
    # compiled kernel (an unsharded tensor: the runner calls the rule twice with the same ``st``
    # dict), the update takes them from there, so u feeds both the sums and the update: inductor
    # then stores u once in a scratch buffer in the sums loop instead of computing its square
    # root and division again per element in the update loop (ViT-S, 1 thread: ~15% of the
    # step).  Separate sums / update calls (sharded tensors, eager) get fresh dicts: the update
    # recomputes the same values with the same ops.
    shared = st.get(_SHARED)
    if shared is None:
        # beta1 * m + beta3 * g as a multiply-add (a lerp by a runtime weight compiles to both
        # of its branches and a blend per element)
        m = st["exp_avg"] * s["beta1"] + (g * s["beta3"] if averaging else g)
        v = K.ema_sq(st["exp_avg_sq"], g, s["beta2"])
        u = m / (v.sqrt() * s["k1"] + s["k2"])  # (m / bc1) / (sqrt(v / bc2) + eps), see _scalars
        if phase == "sums":
            st[_SHARED] = (m, v, u)  # type: ignore[assignment]
    else:
        m, v, u = shared
    if decay == "decoupled":
        p = p * s["decay"]
    mask = (u * g > 0).to(u.dtype) if caution else None
    if phase == "sums":
        out = {"agree": mask} if caution else {}
        if adapt:
            out["p_sq"] = p * p
            if caution:
                um = u * mask  # the mask's scale 1 / c is known only after these sums
                out["um_sq"] = um * um
                if decay == "l2":
                    out["um_p"] = um * p
            else:
                out["u_sq"] = (u + s["wd"] * p) ** 2 if decay == "l2" else u * u
        return out
    new = {"exp_avg": m, "exp_avg_sq": v}
    # per-tensor factors cast to the values' dtype once: the compiled loop does no float64
    # scalar maths per element (the eager result is the same: torch casts them so anyway)
    if caution:
        c = torch.clamp(s["agree"] / s["numel"], min=1e-3)
        u = u * mask * once(c.reciprocal().to(u.dtype))  # a multiply per element
    if decay == "l2":
        u = u + s["wd"] * p
    if adapt:
        if caution:
            u_sq = s["um_sq"] / (c * c)
            if decay == "l2":
                u_sq = u_sq + 2.0 * s["wd"] * s["um_p"] / c + s["wd"] * s["wd"] * s["p_sq"]
        else:
            u_sq = s["u_sq"]
        # one per-tensor factor -lr * r, computed once per call (see _rule_trust.once)
        step = once((trust_ratio(s["p_sq"], u_sq, trust_clip) * -s["lr"]).to(u.dtype))
        return torch.addcmul(p, u, step), new
    return torch.addcmul(p, u, -s["lr"]), new


# The runner's scalar hoisting (``_kernel.HOIST``) makes inductor keep m and v in per-call
# scratch buffers and recompute u in the update loop instead of storing u once (ViT-S, 1 thread:
# ~2.4x -> ~3.1x fused AdamW), so Lamb's kernels opt out; its per-tensor factors go through
# ``once`` instead.
lamb_rule.hoist_scalars = False  # type: ignore[attr-defined]
