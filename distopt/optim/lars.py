"""LARS / LARC: SGD with layer-wise adaptive rate scaling (You et al., 2017; NVIDIA apex LARC)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, check_nesterov, flag, lr, nonneg
from distopt.optim._rule_trust import once

__all__ = ["Lars", "lars_rule"]


class Lars(DistOptimizer):
    r"""LARS, and LARC with ``trust_clip=True``, with the options of timm's implementation.

    Update rule (per parameter tensor ``w``; norms are over the whole tensor)::

        if weight_decay != 0 or always_adapt:
            r = trust_coeff * ||w|| / (||g|| + weight_decay * ||w|| + eps)
                (r = 1 when ||w|| == 0 or ||g|| == 0)
            r <- min(r / lr, 1)                  if trust_clip (LARC)
            g <- (g + weight_decay * w) * r
        b <- g                                   at the first step (a copy), then
        b <- momentum * b + (1 - dampening) * g  (only when momentum != 0)
        g <- g + momentum * b  if nesterov, else b
        w <- w - lr * g

    Under ZeRO or FSDP2 the norms ``||w||`` and ``||g||`` of every tensor of a param group come
    from local partial sums summed across ranks in one reduction.  The step is
    :func:`lars_rule` run by :func:`distopt.optim._kernel.apply`: one pass for the sums (when
    adapting), one fused update.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1.0).
        momentum: momentum factor (default 0).
        dampening: dampening of the gradient in the buffer (default 0).
        weight_decay: L2 penalty, folded into the adapted gradient (default 0).
        nesterov: Nesterov momentum; needs momentum > 0 and dampening == 0 (default False).
        trust_coeff: trust coefficient of the adaptive rate (default 0.001).
        eps: denominator term of the trust ratio (default 1e-8).
        trust_clip: LARC clipping of the trust ratio (default False).
        always_adapt: adapt even when weight_decay == 0 (default False).

    State per parameter: ``momentum_buffer`` (only with momentum != 0; created at the first step
    from the first adapted gradient, as torch's SGD does).
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1.0),
        nonneg("momentum", 0.0),
        nonneg("dampening", 0.0),
        nonneg("weight_decay", 0.0),
        flag("nesterov", False),
        nonneg("trust_coeff", 0.001),
        nonneg("eps", 1e-8),
        flag("trust_clip", False),
        flag("always_adapt", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        check_nesterov(hypers)
        return params, hypers

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        # The momentum buffer starts as the first adapted gradient (torch's SGD semantics):
        # created in _update as zeros, it takes that gradient in the rule (``s["first"]``).
        pass

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        momentum, wd = group["momentum"], group["weight_decay"]
        adapt = wd != 0.0 or bool(group["always_adapt"])
        base = {"lr": float(group["lr"]), "wd": wd, "trust_coeff": group["trust_coeff"],
                "eps": group["eps"], "momentum": momentum, "dampening": group["dampening"]}  # fmt: skip
        later, first = {**base, "first": 0.0}, {**base, "first": 1.0}
        scalars = []
        for v in views:
            if momentum != 0.0 and "momentum_buffer" not in v.state:
                v.state["momentum_buffer"] = torch.zeros_like(
                    v.data, memory_format=torch.preserve_format
                )
                scalars.append(first)
            else:
                scalars.append(later)
        K.apply(
            self,
            lars_rule,
            views,
            ("momentum_buffer",) if momentum != 0.0 else (),
            scalars,
            ctx=ctx if adapt else None,
            sums=("w_sq", "g_sq") if adapt else (),
            adapt=adapt,
            trust_clip=bool(group["trust_clip"]),
            momentum=momentum != 0.0,
            nesterov=bool(group["nesterov"]),
        )


def lars_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    adapt: bool,
    trust_clip: bool,
    momentum: bool,
    nesterov: bool,
    phase: str = "update",
) -> Any:
    """Lars' update of one tensor (see :class:`Lars`); with ``adapt``, ``phase="sums"`` gives
    the whole-tensor sums of squares ``w_sq`` and ``g_sq`` the trust ratio needs."""
    if adapt:
        if phase == "sums":
            return {"w_sq": p * p, "g_sq": g * g}
        w, gn = s["w_sq"].clamp_min(0).sqrt(), s["g_sq"].clamp_min(0).sqrt()
        r = s["trust_coeff"] * w / (gn + w * s["wd"] + s["eps"])
        r = torch.where((w > 0) & (gn > 0), r, torch.ones_like(r))
        if trust_clip:
            r = torch.clamp(r / s["lr"], max=1.0)
        # one fp32 factor per tensor, computed once per kernel call (see _rule_trust.once)
        g = (g + s["wd"] * p) * once(r.to(g.dtype))
    new = {}
    if momentum:
        b = torch.where(
            s["first"] > 0, g, st["momentum_buffer"] * s["momentum"] + (1.0 - s["dampening"]) * g
        )
        new["momentum_buffer"] = b
        g = g + s["momentum"] * b if nesterov else b
    return torch.addcmul(p, g, -s["lr"]), new
