"""MARS: variance-reduced preconditioned gradients (Yuan et al., 2024, "MARS: Unleashing the
Power of Variance Reduction for Training Large Models", arXiv:2411.10438), timm's options."""

from __future__ import annotations

from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim._cautious import cautious_masks
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, betas, flag, lr, nonneg, option

__all__ = ["Mars"]


def _mars_type(name: str, value: Any) -> Any:
    if value not in ("adamw", "lion"):
        raise ValueError(f"Invalid {name}: {value!r} (choose 'adamw' or 'lion')")
    return value


def _betas_1d(name: str, value: Any) -> Any:
    if value is None:
        return None
    return betas((0.9, 0.99), name).validate(value)


class Mars(DistOptimizer):
    r"""MARS, with timm's options and defaults (names ``mars``, ``cmars``).

    For a matrix (or any parameter with ``optimize_1d``), step ``t``::

        c  = g                                                       at the first step
        c  = g + gamma * beta1 / (1 - beta1) * (g - g_prev)          afterwards
        c <- c / max(||c||, 1)                                       (norm of the whole tensor)
        m <- beta1 m + (1 - beta1) c          (m * cautious mask(m, g) in the update if caution)
        adamw:  v <- beta2 v + (1 - beta2) c^2;  u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
        lion:   u = sign(m)
        p <- p - lr * (u + weight_decay * p)

    Other parameters take AdamW with ``betas_1d`` (default ``betas``) on the raw gradient and
    ``lr * lr_1d_factor``.  Under sharding the norms are one batched reduction.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 3e-3).
        betas: moment coefficients (default (0.9, 0.99)).
        eps: denominator term (default 1e-8).
        weight_decay: weight decay added to the update (default 0).
        gamma: variance-reduction scale (default 0.025).
        mars_type: ``"adamw"`` or ``"lion"`` (default "adamw").
        optimize_1d: MARS for vectors too (default False).
        lr_1d_factor: lr factor of the AdamW vectors (default 1.0).
        betas_1d: betas of the AdamW vectors; None: ``betas`` (default None).
        caution: the cautious mask (default False).

    State per parameter: ``step``, ``exp_avg``, ``last_grad``, ``exp_avg_sq``.
    """

    elementwise = False  # the norm of c is over the whole tensor

    hypers = HyperSpec(
        lr(3e-3),
        betas((0.9, 0.99)),
        nonneg("eps", 1e-8),
        nonneg("weight_decay", 0.0),
        nonneg("gamma", 0.025),
        option("mars_type", "adamw", "str", _mars_type),
        flag("optimize_1d", False),
        nonneg("lr_1d_factor", 1.0),
        option("betas_1d", None, "tuple[float, float] | None", _betas_1d),
        flag("caution", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, {**hypers, "betas_1d": hypers["betas_1d"] or hypers["betas"]}

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["exp_avg"] = self._zeros(view)
        view.state["last_grad"] = self._zeros(view)
        view.state["exp_avg_sq"] = self._zeros(view)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        mars = [v for v in views if group["optimize_1d"] or len(v.shape) >= 2]
        rest = [v for v in views if not (group["optimize_1d"] or len(v.shape) >= 2)]
        # fixed order of reductions on every rank: MARS norms, MARS caution, AdamW caution
        self._mars(group, mars, ctx)
        self._adamw_1d(group, rest, ctx)
        for v in views:
            v.state["last_grad"].copy_(v.grad)

    def _mars(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr, wd = float(group["lr"]), group["weight_decay"]
        beta1, beta2 = group["betas"]
        steps = F.advance_steps(views)
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        scale = group["gamma"] * beta1 / (1.0 - beta1)
        cs = []
        for v, t in zip(views, steps):
            if t == 1.0:
                cs.append(v.grad.clone())
            else:
                cs.append((v.grad - v.state["last_grad"]).mul_(scale).add_(v.grad))
        (norms,) = F.global_norms(ctx, views, cs)
        torch._foreach_div_(cs, [n.clamp(min=1.0) for n in norms])
        m = [v.state["exp_avg"] for v in views]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, cs, alpha=1.0 - beta1)
        num = torch._foreach_mul(m, cautious_masks(ctx, views, m, grads)) if group["caution"] else m
        if group["mars_type"] == "adamw":
            sq = [v.state["exp_avg_sq"] for v in views]
            F.ema_sq_(sq, cs, beta2)
            denom = F.adam_denominator(sq, F.bias_correction(beta2, steps), group["eps"])
            upd = torch._foreach_div(num, F.bias_correction(beta1, steps))
            torch._foreach_div_(upd, denom)
        else:
            upd = torch._foreach_sign(num)
        if wd != 0.0:
            torch._foreach_add_(upd, params, alpha=wd)
        torch._foreach_add_(params, upd, alpha=-lr)

    def _adamw_1d(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr, wd = float(group["lr"]) * group["lr_1d_factor"], group["weight_decay"]
        beta1, beta2 = group["betas_1d"]
        steps = F.advance_steps(views)
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        m = [v.state["exp_avg"] for v in views]
        sq = [v.state["exp_avg_sq"] for v in views]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1.0 - beta1)
        F.ema_sq_(sq, grads, beta2)
        denom = F.adam_denominator(sq, F.bias_correction(beta2, steps), group["eps"])
        num = torch._foreach_mul(m, cautious_masks(ctx, views, m, grads)) if group["caution"] else m
        upd = torch._foreach_div(num, F.bias_correction(beta1, steps))
        torch._foreach_div_(upd, denom)
        if wd != 0.0:
            torch._foreach_add_(upd, params, alpha=wd)
        torch._foreach_add_(params, upd, alpha=-lr)
