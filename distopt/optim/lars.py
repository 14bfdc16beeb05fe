"""LARS / LARC: SGD with layer-wise adaptive rate scaling (You et al., 2017; NVIDIA apex LARC)."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, check_nesterov, flag, lr, nonneg


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
    from local partial sums summed across ranks in one reduction.

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
        # The momentum buffer is the first adapted gradient, known only inside the update.
        pass

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        momentum, wd = group["momentum"], group["weight_decay"]
        params, grads = F.columns(views)
        if wd != 0.0 or group["always_adapt"]:
            w_norms, g_norms = F.global_norms(ctx, views, params, grads)
            w, g = torch.stack(w_norms), torch.stack(g_norms)
            ratio = group["trust_coeff"] * w / (g + w * wd + group["eps"])
            one = torch.ones_like(ratio)
            ratio = torch.where(w > 0, torch.where(g > 0, ratio, one), one)
            if group["trust_clip"]:
                ratio = torch.clamp(ratio / lr, max=1.0)
            grads = torch._foreach_add(grads, params, alpha=wd)  # new tensors: v.grad untouched
            torch._foreach_mul_(grads, list(ratio.unbind(0)))
        if momentum != 0.0:
            old = [i for i, v in enumerate(views) if "momentum_buffer" in v.state]
            if old:
                bufs = [views[i].state["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1.0 - group["dampening"])
            for v, gr in zip(views, grads):
                if "momentum_buffer" not in v.state:
                    v.state["momentum_buffer"] = gr.detach().clone()
            bufs = [v.state["momentum_buffer"] for v in views]
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-lr)
