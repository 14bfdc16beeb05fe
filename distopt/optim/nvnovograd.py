"""NvNovoGrad: NVIDIA's NovoGrad, Adam-like moments with a per-layer second moment.

Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of
Deep Networks" (2019), as in NVIDIA's Jasper example and timm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, adam_hypers, flag, with_max_lr_snapshot
from distopt.optim._rule_trust import inv_grad_scale, squared_norms

__all__ = ["NvNovoGrad", "nvnovograd_rule"]


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
    one reduction.  The step reads the gradients once for those norms, updates the scalar
    second moments on the device, then runs :func:`nvnovograd_rule` over the group in one
    :func:`~distopt.optim._kernel.apply`: one fused pass, each tensor's denominator a statistic
    given to the kernel (no host read).

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

    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

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
            view.state["max_exp_avg_sq"] = torch.zeros(
                (), dtype=torch.float32, device=view.data.device
            )

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        F.advance_steps(views)
        # the one extra read: ||g||^2 of each whole tensor (partial sums added across ranks),
        # one _foreach_norm for all of them
        n = squared_norms(ctx, views, [v.grad for v in views])[:, 0].float()
        inv = inv_grad_scale(self, n.device)
        if inv is not None:  # GradScaler's scaled gradients: the norms of the true ones
            n = n * (inv * inv)
        _, found_inf = K.scaler_of(self)
        skip = None if found_inf is None else found_inf.to(n.device, torch.float32) > 0
        sqs = [v.state["exp_avg_sq"] for v in views]
        v_old = torch.stack(sqs)
        v_new = torch.where(v_old == 0, n, v_old * beta2 + n * (1.0 - beta2))
        torch._foreach_copy_(sqs, list(_kept(skip, v_old, v_new).unbind(0)))
        if group["amsgrad"]:
            maxes = [v.state["max_exp_avg_sq"] for v in views]
            m_old = torch.stack(maxes)
            v_new = torch.maximum(m_old, v_new)
            torch._foreach_copy_(maxes, list(_kept(skip, m_old, v_new).unbind(0)))
        denom = v_new.sqrt() + group["eps"]
        decoupled = wd != 0.0 and bool(group["decoupled_decay"])
        if decoupled and group["corrected_weight_decay"]:
            decay = 1.0 - lr * lr / group["max_lr_snapshot"] * wd
        else:
            decay = 1.0 - lr * wd
        scalars = {"lr": lr, "beta1": beta1, "wd": wd, "decay": decay}
        opts = {
            "decay": ("decoupled" if decoupled else "l2") if wd != 0.0 else "none",
            "averaging": bool(group["grad_averaging"]),
        }
        # The denominator is a device scalar per tensor: its float32 reciprocal goes to the kernels
        # as a caller-given statistic (one apply for the group, small tensors stacked as rows).
        inv_d = denom.reciprocal().double().unsqueeze(1)
        K.apply(
            self,
            nvnovograd_rule,
            views,
            ("exp_avg",),
            scalars,
            sums=("inv_d",),
            stats=list(inv_d.unbind(0)),
            **opts,
        )


def _kept(skip: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    """``new``, or ``old`` where GradScaler found an inf/NaN this step (no host read)."""
    return new if skip is None else torch.where(skip, old, new)


def nvnovograd_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    decay: str,
    averaging: bool,
    phase: str = "update",
) -> tuple[Tensor, dict[str, Tensor]]:
    """NvNovoGrad's element-wise update of one tensor (see :class:`NvNovoGrad`);
    ``s["inv_d"]``: the tensor's ``1 / (sqrt(v') + eps)`` (float32, carried as float64), cast
    before it meets ``g`` (so a column of them, for stacked small tensors, gives the same
    numbers).  The statistic is always the caller's (``apply(..., stats=)``): there is no
    ``phase="sums"``."""
    if phase != "update":
        raise ValueError(f"nvnovograd_rule: inv_d is given by the caller, no {phase!r} phase")
    u = g * s["inv_d"].to(g.dtype)
    if decay == "decoupled":
        p = p * s["decay"]
    elif decay == "l2":
        u = u + s["wd"] * p
    if averaging:
        u = u * (1.0 - s["beta1"])
    m = st["exp_avg"] * s["beta1"] + u
    return torch.addcmul(p, m, -s["lr"]), {"exp_avg": m}
