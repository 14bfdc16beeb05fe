"""NvNovoGrad: NVIDIA's NovoGrad, Adam-like moments with a per-layer second moment.

Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of
Deep Networks" (2019), as in NVIDIA's Jasper example and timm.
"""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, adam_hypers, flag, with_max_lr_snapshot


class NvNovoGrad(DistOptimizer):
    r"""NovoGrad with a scalar second moment per parameter tensor (timm's semantics).

    Update rule (``n = ||g||^2`` over the whole tensor)::

        v <- n                                 if v == 0 (the first step), else
        v <- beta2 * v + (1 - beta2) * n
        v' <- max(v', v)  if amsgrad else v
        u = g / (sqrt(v') + eps)
        u <- u + weight_decay * w              (or, with decoupled_decay,
                                                w <- w * (1 - s * weight_decay), s = lr, or
                                                lr^2 / max_lr with corrected_weight_decay)
        u <- (1 - beta1) * u                   if grad_averaging
        m <- beta1 * m + u
        w <- w - lr * m

    Under ZeRO or FSDP2 the squared gradient norms of a param group are summed across ranks in
    one reduction.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: running-average coefficients (default (0.95, 0.98)).
        eps: denominator term (default 1e-8).
        weight_decay: weight decay (default 0).
        grad_averaging: scale the normalised gradient by ``1 - beta1`` (default False).
        amsgrad: use the running maximum of the second moment (default False).
        decoupled_decay: decay the weights directly (default False).
        corrected_weight_decay: with decoupled_decay, scale the decay by ``lr^2 / max_lr``
            where ``max_lr`` is the constructor's lr, kept in each group as
            ``max_lr_snapshot`` (default False).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq`` (a float32
    scalar) and, with amsgrad, ``max_exp_avg_sq`` (a float32 scalar).
    """

    hypers = HyperSpec(
        *adam_hypers(1e-3, betas_default=(0.95, 0.98)),
        flag("grad_averaging", False),
        flag("amsgrad", False),
        flag("decoupled_decay", False),
        flag("corrected_weight_decay", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["exp_avg"] = self._zeros(view)
        view.state["exp_avg_sq"] = torch.zeros((), dtype=torch.float32, device=view.data.device)
        if group["amsgrad"]:
            view.state["max_exp_avg_sq"] = torch.zeros((), dtype=torch.float32, device=view.data.device)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        F.advance_steps(views)
        params, grads = F.columns(views)
        (sumsq,) = ctx.reduce([F.local_sumsq(grads)], list(views))
        n = torch.stack([s.reshape(()) for s in sumsq]).float()
        sqs = [v.state["exp_avg_sq"] for v in views]
        v_old = torch.stack(sqs)
        v_new = torch.where(v_old == 0, n, v_old * beta2 + n * (1.0 - beta2))
        torch._foreach_copy_(sqs, list(v_new.unbind(0)))
        if group["amsgrad"]:
            maxes = [v.state["max_exp_avg_sq"] for v in views]
            v_new = torch.maximum(torch.stack(maxes), v_new)
            torch._foreach_copy_(maxes, list(v_new.unbind(0)))
        denom = v_new.sqrt() + group["eps"]
        updates = torch._foreach_div(grads, list(denom.unbind(0)))
        if wd != 0.0:
            if group["decoupled_decay"]:
                scale = lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
                torch._foreach_mul_(params, 1.0 - scale * wd)
            else:
                torch._foreach_add_(updates, params, alpha=wd)
        if group["grad_averaging"]:
            torch._foreach_mul_(updates, 1.0 - beta1)
        exp_avgs = [v.state["exp_avg"] for v in views]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, updates)
        torch._foreach_add_(params, exp_avgs, alpha=-lr)
