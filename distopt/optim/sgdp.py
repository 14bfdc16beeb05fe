"""SGDP: SGD with momentum and the projection of AdamP (Heo et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import REQUIRED, HyperSpec, flag, lr, nonneg
from distopt.optim._projection import project_, projected_update, projection_parts
from distopt.optim._rule_guard import scaled_update


class SGDP(DistOptimizer):
    r"""SGDP, with the options of timm's implementation.

    Update rule (``g`` the gradient; the momentum buffer starts at zero)::

        b <- momentum * b + (1 - dampening) * g
        u = g + momentum * b            if nesterov, else b
        u, r = project(w, g, u)         see :class:`~distopt.optim.AdamP` (r = wd_ratio when a
                                        projection was applied, else 1)
        w <- w * (1 - lr * weight_decay * r / (1 - momentum))     (only when weight_decay != 0)
        w <- w - lr * u

    Args:
        params: parameters or param groups.
        lr: learning rate (required, as in timm).
        momentum: momentum factor (default 0).
        dampening: dampening of the gradient in the buffer (default 0).
        weight_decay: decoupled weight decay, divided by ``1 - momentum`` (default 0).
        nesterov: Nesterov momentum (default False).
        eps: cosine / normalisation epsilon of the projection (default 1e-8).
        delta: threshold of the cosine test (default 0.1).
        wd_ratio: weight-decay multiplier of projected tensors (default 0.1).
        caution: cautious masking of the update (default False).

    State per parameter: ``momentum`` (the buffer, timm's name).
    """

    # torch.amp.GradScaler: see distopt.optim._kernel (caution=True: distopt.optim._rule_guard)
    _step_supports_amp_scaling = True

    hypers = HyperSpec(
        lr(REQUIRED),
        nonneg("momentum", 0.0),
        nonneg("dampening", 0.0),
        nonneg("weight_decay", 0.0),
        flag("nesterov", False),
        nonneg("eps", 1e-8),
        nonneg("delta", 0.1),
        nonneg("wd_ratio", 0.1),
        flag("caution", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if hypers["weight_decay"] != 0.0 and hypers["momentum"] >= 1.0:
            raise ValueError(
                f"Invalid momentum: {hypers['momentum']} (weight decay is divided by 1 - momentum, "
                "so momentum must be < 1 when weight_decay != 0)"
            )
        return params, hypers

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["momentum"] = self._zeros(view)

    def statistics_reads(self, group: dict[str, Any]) -> frozenset[str] | None:
        """What the whole-tensor statistics of ``group`` read beyond the update (for ``distopt
        bench step``'s bytes per parameter): the channel sums read p and g (the momentum
        buffer's dots come from the update's own pass, the projection then reads p and the
        stored buffer); with ``caution`` the mask's mean needs the update, so everything."""
        return None if group["caution"] else frozenset({"param", "grad"})

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        if group["caution"]:
            update = lambda vs: self._update_cautious(group, vs, ctx)  # noqa: E731
            scaled_update(self, views, ("momentum",), update)
            return
        lr = float(group["lr"])
        momentum, wd = group["momentum"], group["weight_decay"]
        rate = lr * wd / (1.0 - momentum) if wd != 0.0 and lr != 0.0 else 0.0
        base = {"momentum": momentum, "damp": 1.0 - group["dampening"], "neg_lr": -lr}
        nesterov = bool(group["nesterov"])
        vecs = [v for v in views if len(v.shape) <= 1]
        mats = [v for v in views if len(v.shape) > 1]
        if vecs:
            scalars = [{**base, "decay": 1.0 - rate}] * len(vecs)
            K.apply(self, sgdp_rule, vecs, ("momentum",), scalars, nesterov=nesterov)
        if mats:
            scalars = [{**base, "decay": 1.0}] * len(mats)  # the decay is in the factors
            projected_update(
                self, ctx, sgdp_rule, mats, ("momentum",), scalars, delta=group["delta"],
                wd_ratio=group["wd_ratio"], eps=group["eps"], rates=[rate] * len(mats),
                steps=[lr] * len(mats), nesterov=nesterov,
            )  # fmt: skip

    def _update_cautious(
        self, group: dict[str, Any], views: list[ParamView], ctx: StepContext
    ) -> None:
        """``caution=True``: the multi-pass form (the mask's mean needs the projected update)."""
        lr = float(group["lr"])
        momentum, wd = group["momentum"], group["weight_decay"]
        params, grads, bufs = F.columns(views, "momentum")
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1.0 - group["dampening"])
        if group["nesterov"]:
            updates = torch._foreach_add(grads, bufs, alpha=momentum)
        else:
            updates = torch._foreach_mul(bufs, 1.0)  # a copy: the projection works in place
        ratios = project_(
            ctx, views, grads, updates, group["delta"], group["wd_ratio"], group["eps"], True
        )
        if wd != 0.0 and lr != 0.0:
            torch._foreach_mul_(params, [1.0 - lr * wd * r / (1.0 - momentum) for r in ratios])
        torch._foreach_add_(params, updates, alpha=-lr)


def sgdp_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    nesterov: bool,
    phase: str = "update",
) -> Any:
    """SGDP's update of one tensor (see :class:`SGDP`) without the projection, which
    the channel factors fold into ``p`` (:func:`~distopt.optim._projection.channel_factors`).

    ``phase="rows"``: ``(the products the projection's channel statistics sum, u, the new
    states)``; ``phase="apply"``: the new ``p`` from the NEW momentum buffer in ``st`` (the
    rows phase's, as stored: ``u`` is computed from it again, a read of the buffer instead of
    a buffer for ``u``)."""
    if phase == "apply":
        b = st["momentum"]
    else:
        b = st["momentum"] * s["momentum"] + g * s["damp"]
    u = g + b * s["momentum"] if nesterov else b
    if phase == "rows":
        return projection_parts(p, g, u), u, {"momentum": b}
    new_p = p * s["decay"] + u * s["neg_lr"]
    return new_p if phase == "apply" else (new_p, {"momentum": b})
