"""Adan: adaptive Nesterov momentum (Xie et al., 2022, arXiv:2208.06677), timm's options."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, betas, flag, lr, nonneg

__all__ = ["Adan"]


class Adan(DistOptimizer):
    r"""Adan, with timm's options and defaults (names ``adan``, ``adanw``: ``no_prox``, ``cadan``).

    Update rule for step ``t`` (element-wise; the cautious mask's mean is over the whole tensor),
    ``d = g - g_prev`` (0 at a parameter's first step)::

        m <- beta1 m + (1 - beta1) g
        e <- beta2 e + (1 - beta2) d
        v <- beta3 v + (1 - beta3) (g + beta2 d)^2
        D  = sqrt(v) / sqrt(1 - beta3^t) + eps
        u  = lr / (1 - beta1^t) * m / D + lr * beta2 / (1 - beta2^t) * e / D
             (m * cautious mask(m, g) if caution)
        no_prox: p <- p * (1 - lr * wd) - u;   else: p <- (p - u) / (1 + lr * wd)

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2, beta3)`` (default (0.98, 0.92, 0.99)).
        eps: denominator term (default 1e-8).
        weight_decay: weight decay (default 0).
        no_prox: decoupled decay before the step instead of the proximal division (default False).
        caution: the cautious mask (default False).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``exp_avg_diff``,
    ``neg_pre_grad`` (minus the previous gradient).  timm counts steps per param group; distopt
    per parameter (the same unless a parameter misses steps).
    """

    elementwise = True
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1e-3),
        betas((0.98, 0.92, 0.99), n=3),
        nonneg("eps", 1e-8),
        nonneg("weight_decay", 0.0),
        flag("no_prox", False),
        flag("caution", False),
    )

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        return bool(group["caution"])

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["exp_avg"] = self._zeros(view)
        view.state["exp_avg_sq"] = self._zeros(view)
        view.state["exp_avg_diff"] = self._zeros(view)
        view.state["neg_pre_grad"] = self._zeros(view)  # -g of the previous step (d = 0 at step 1)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2, beta3 = group["betas"]
        wd = group["weight_decay"]
        no_prox = bool(group["no_prox"])
        # one division per element: u = (k1 m + k2 e) / (sqrt(v) + eps bc3), the bias corrections,
        # the learning rate and the proximal 1 / (1 + lr wd) folded into host scalars k1, k2
        shrink = 1.0 if wd == 0.0 or no_prox else 1.0 / (1.0 + lr * wd)
        keep = (1.0 - lr * wd) if no_prox else shrink
        per_step: dict[float, dict[str, float]] = {}  # one scalar set per distinct step count
        scalars = []
        for v, t in zip(views, F.advance_steps(views)):
            sc = per_step.get(t)
            if sc is None:
                bc3 = (1.0 - beta3**t) ** 0.5
                sc = per_step[t] = {
                    "beta1": beta1,
                    "beta2": beta2,
                    "beta3": beta3,
                    "eps_bc3": group["eps"] * bc3,
                    "k1": lr / (1.0 - beta1**t) * bc3 * shrink,
                    "k2": lr * beta2 / (1.0 - beta2**t) * bc3 * shrink,
                    "first": float(t == 1.0),
                    "keep": keep,
                }
            scalars.append({**sc, "numel": float(v.numel)} if group["caution"] else sc)
        caution = bool(group["caution"])
        K.apply(
            self,
            adan_rule,
            views,
            ("exp_avg", "exp_avg_diff", "exp_avg_sq", "neg_pre_grad"),
            scalars,
            ctx=ctx,
            sums=K.CAUTION_SUMS if caution else (),
            caution=caution,
            decay=wd != 0.0,
        )


def adan_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    caution: bool,
    decay: bool,
    phase: str = "update",
) -> Any:
    """Adan's update of one tensor (see :class:`Adan`; ``s["first"]``: the previous gradient is
    this one at the first step; ``k1``, ``k2``, ``eps_bc3``, ``keep``: see :meth:`Adan._update`)."""
    diff = torch.where(s["first"] > 0, torch.zeros_like(g), st["neg_pre_grad"] + g)  # g - g_prev
    m = torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"])
    e = torch.lerp(st["exp_avg_diff"], diff, 1.0 - s["beta2"])
    n = diff * s["beta2"] + g
    sq = K.ema_sq(st["exp_avg_sq"], n, s["beta3"])
    num = m
    if caution:
        if phase == "sums":
            return K.agreement(m, g)
        num = K.cautious(m, g, s)
    # lr m / (bc1 D) + lr beta2 e / (bc2 D) with D = sqrt(v) / bc3 + eps: one division
    u = (s["k1"] * num + s["k2"] * e) / (sq.sqrt() + s["eps_bc3"])
    if decay:  # no_prox: p (1 - lr wd) - u;  else (p - u) / (1 + lr wd), 1 / (1 + lr wd) in k1, k2
        p = p * s["keep"]
    return p - u, {"exp_avg": m, "exp_avg_diff": e, "exp_avg_sq": sq, "neg_pre_grad": -g}
