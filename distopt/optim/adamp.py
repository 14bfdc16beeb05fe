"""AdamP: Adam with the projection that slows the weight-norm growth of scale-invariant weights.

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
Weights" (ICLR 2021).  The projection lives in :mod:`distopt.optim._projection`, shared with SGDP.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, adam_hypers, flag, nonneg
from distopt.optim._projection import project_, projected_update, projection_parts
from distopt.optim._rule_guard import scaled_update


class AdamP(DistOptimizer):
    r"""AdamP, with the options of timm's implementation.

    Update rule for step ``t`` (``g`` the gradient; bias corrections ``bc_k = 1 - beta_k^t``)::

        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        d = sqrt(v) / sqrt(bc2) + eps
        u = m / d                       (nesterov: (beta1 * m + (1 - beta1) * g) / d)
        u, r = project(w, g, u)         for tensors with > 1 dim: if, for every channel
                                        (dim-0 row), |cos(g, w)| < delta / sqrt(channel size),
                                        remove from u its component along each normalised
                                        channel; else try the same on the whole tensor
                                        (threshold delta / sqrt(numel)); r = wd_ratio if a
                                        projection was applied, else 1
        w <- w * (1 - lr * weight_decay * r)      (only when weight_decay > 0)
        w <- w - lr / bc1 * u

    With ``caution=True`` the update is masked where it disagrees in sign with the gradient
    (for projected tensors: with the gradient's tangential part, then projected again), the mask
    rescaled by ``1 / max(mean(mask), 1e-3)`` (Cautious Optimizers, Liang et al., 2024).

    Under ZeRO or FSDP2 (dim-0 shards) the channel statistics are local; the layer statistics,
    the all-channels test and the mask means are summed across ranks in one reduction per phase.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: running-average coefficients (default (0.9, 0.999)).
        eps: denominator term, also the cosine / normalisation epsilon (default 1e-8).
        weight_decay: decoupled weight decay (default 0).
        delta: threshold of the cosine test (default 0.1).
        wd_ratio: weight-decay multiplier of projected tensors (default 0.1).
        nesterov: Nesterov-style first moment (default False).
        caution: cautious masking of the update (default False).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq``.
    """

    # torch.amp.GradScaler: see distopt.optim._kernel (caution=True: distopt.optim._rule_guard)
    _step_supports_amp_scaling = True

    hypers = HyperSpec(
        *adam_hypers(1e-3),
        nonneg("delta", 0.1),
        nonneg("wd_ratio", 0.1),
        flag("nesterov", False),
        flag("caution", False),
    )

    _zero_state = ("exp_avg", "exp_avg_sq")

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        if group["caution"]:
            states = ("exp_avg", "exp_avg_sq")
            scaled_update(self, views, states, lambda vs: self._update_cautious(group, vs, ctx))
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        rate = lr * wd if wd > 0.0 and lr != 0.0 else 0.0
        scalars = []
        shared: dict[tuple[float, bool], dict[str, float]] = {}  # one mapping per distinct set
        for v, t in zip(views, F.advance_steps(views)):
            projected = len(v.shape) > 1  # its decay is in the channel factors
            sc = shared.get((t, projected))
            if sc is None:
                sc = shared[(t, projected)] = {
                    "beta1": beta1, "one_m_beta1": 1.0 - beta1, "beta2": beta2, "eps": eps,
                    "inv_bc2_sqrt": 1.0 / math.sqrt(1.0 - beta2**t),
                    "neg_step": -lr / (1.0 - beta1**t), "decay": 1.0 if projected else 1.0 - rate,
                }  # fmt: skip
            scalars.append(sc)
        nesterov = bool(group["nesterov"])
        states = ("exp_avg", "exp_avg_sq")
        vecs = [(v, sc) for v, sc in zip(views, scalars) if len(v.shape) <= 1]
        mats = [(v, sc) for v, sc in zip(views, scalars) if len(v.shape) > 1]
        if vecs:
            vs, scs = zip(*vecs)
            K.apply(self, adamp_rule, list(vs), states, list(scs), nesterov=nesterov)
        if mats:
            ms, scs = (list(x) for x in zip(*mats))
            projected_update(
                self, ctx, adamp_rule, ms, states, scs, delta=group["delta"],
                wd_ratio=group["wd_ratio"], eps=eps, rates=[rate] * len(ms),
                steps=[-sc["neg_step"] for sc in scs], nesterov=nesterov,
            )  # fmt: skip

    def _update_cautious(
        self, group: dict[str, Any], views: list[ParamView], ctx: StepContext
    ) -> None:
        """``caution=True``: the multi-pass form (the mask's mean needs the projected update)."""
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        steps = F.advance_steps(views)
        bc1, bc2 = F.bias_correction(beta1, steps), F.bias_correction(beta2, steps)
        params, grads, exp_avgs, exp_avg_sqs = F.columns(views, "exp_avg", "exp_avg_sq")
        F.ema_(exp_avgs, grads, beta1)
        F.ema_sq_(exp_avg_sqs, grads, beta2)
        denom = F.adam_denominator(exp_avg_sqs, bc2, eps)
        if group["nesterov"]:
            updates = torch._foreach_mul(exp_avgs, beta1)
            torch._foreach_add_(updates, grads, alpha=1.0 - beta1)
            torch._foreach_div_(updates, denom)
        else:
            updates = torch._foreach_div(exp_avgs, denom)
        ratios = project_(ctx, views, grads, updates, group["delta"], group["wd_ratio"], eps, True)
        if wd > 0.0 and lr != 0.0:
            torch._foreach_mul_(params, [1.0 - lr * wd * r for r in ratios])
        torch._foreach_mul_(updates, [-lr / b for b in bc1])
        torch._foreach_add_(params, updates)


def adamp_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    nesterov: bool,
    phase: str = "update",
) -> Any:
    """AdamP's update of one tensor (see :class:`AdamP`) without the projection, which
    the channel factors fold into ``p`` (:func:`~distopt.optim._projection.channel_factors`).

    ``phase="rows"``: ``(the products the projection's channel statistics sum, u, the new
    states)``; ``phase="apply"``: the new ``p`` from ``st["u"]`` (a ``u`` the rows phase gave;
    ``g`` unused)."""
    if phase == "apply":
        return p * s["decay"] + st["u"] * s["neg_step"]
    # timm's arithmetic (beta1 m + (1 - beta1) g, sqrt(v) / sqrt(bc2) + eps) with the bias
    # correction multiplied by its host reciprocal: one division per element (compiled loops
    # divide at a fraction of the memory rate)
    m = st["exp_avg"] * s["beta1"] + g * s["one_m_beta1"]
    v = K.ema_sq(st["exp_avg_sq"], g, s["beta2"])
    denom = v.sqrt() * s["inv_bc2_sqrt"] + s["eps"]
    u = (m * s["beta1"] + g * s["one_m_beta1"]) / denom if nesterov else m / denom
    new = {"exp_avg": m, "exp_avg_sq": v}
    if phase == "rows":
        return projection_parts(p, g, u), u, new
    return adamp_rule(p, g, {"u": u}, s, nesterov=nesterov, phase="apply"), new


#: u (a square root and a division per element) is computed once by the fused per-channel
#: update, for the channel sums and the update (see distopt.optim._rule_rows.fused_update)
adamp_rule.u_once = True  # type: ignore[attr-defined]
