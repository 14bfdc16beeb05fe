"""ADOPT: Adam that converges with any beta2 (Taniguchi et al., 2024, arXiv:2411.02853), with
timm's options (decoupled decay, cautious mask)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, betas, flag, lr, nonneg, with_max_lr_snapshot

__all__ = ["Adopt"]


class Adopt(DistOptimizer):
    r"""ADOPT, with timm's options and defaults (names ``adopt``, ``adoptw``, ``cadopt``, ``cadoptw``).

    Update rule (element-wise; the cautious mask's mean is over the whole tensor).  ``g <- g +
    weight_decay * p`` first unless ``decoupled``.  Step 1 only initialises ``v = g^2``.  Then::

        p <- p * (1 - s * weight_decay)                         if decoupled (s = lr or lr^2 / max_lr)
        n  = g / max(sqrt(v), eps),  clipped to +-(t - 1)^clip_exp  (unless clip_exp is None)
        m <- beta1 m + (1 - beta1) n
        p <- p - lr * m   (m * cautious mask(m, g) if caution)
        v <- beta2 v + (1 - beta2) g^2

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: moment coefficients (default (0.9, 0.9999)).
        eps: floor of sqrt(v) (default 1e-6).
        clip_exp: exponent of the normalised-gradient clip; None disables (default 0.333).
        weight_decay: weight decay (default 0).
        decoupled: decoupled decay instead of L2 (default False).
        corrected_weight_decay: decoupled decay by ``lr^2 / max_lr`` (default False).
        caution: the cautious mask (default False).
        maximize: maximize the objective (default False).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    elementwise = True
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1e-3),
        betas((0.9, 0.9999)),
        nonneg("eps", 1e-6),
        nonneg("clip_exp", 0.333, optional=True),
        nonneg("weight_decay", 0.0),
        flag("decoupled", False),
        flag("corrected_weight_decay", False),
        KW_ONLY,
        flag("caution", False),
        flag("maximize", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        return bool(group["caution"])

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["exp_avg"] = self._zeros(view)
        view.state["exp_avg_sq"] = self._zeros(view)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd, decoupled = group["weight_decay"], group["decoupled"]
        s = lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
        clip_exp = group["clip_exp"]
        scalars = [
            {
                "lr": lr,
                "beta1": beta1,
                "beta2": beta2,
                "eps": group["eps"],
                "wd": wd,
                "decay": 1.0 - s * wd if (wd != 0.0 and decoupled) else 1.0,
                "first": float(t == 1.0),
                "clip": (t - 1.0) ** clip_exp if clip_exp is not None and t > 1.0 else 0.0,
                "numel": float(v.numel),
            }
            for v, t in zip(views, F.advance_steps(views))
        ]
        caution = bool(group["caution"])
        K.apply(
            self,
            adopt_rule,
            views,
            ("exp_avg", "exp_avg_sq"),
            scalars,
            ctx=ctx,
            sums=K.CAUTION_SUMS if caution else (),
            caution=caution,
            maximize=bool(group["maximize"]),
            l2=wd != 0.0 and not decoupled,
            clip=clip_exp is not None,
        )


def adopt_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    caution: bool,
    maximize: bool,
    l2: bool,
    clip: bool,
    phase: str = "update",
) -> Any:
    """ADOPT's update of one tensor (see :class:`Adopt`; ``s["first"]``: the first step only
    initialises the second moment)."""
    g = K.gradient_in(g, p, s["wd"] if l2 else None, maximize)
    sq = st["exp_avg_sq"]
    normed = g / torch.clamp(sq.sqrt(), min=s["eps"])
    if clip:
        normed = torch.clamp(normed, -s["clip"], s["clip"])
    m = torch.lerp(st["exp_avg"], normed, 1.0 - s["beta1"])
    u = m
    if caution:
        if phase == "sums":
            return K.agreement(u, g)
        u = K.cautious(u, g, s)
    first = s["first"] > 0
    new_p = torch.where(first, p, p * s["decay"] - s["lr"] * u)
    new_sq = torch.where(first, sq + g * g, K.ema_sq(sq, g, s["beta2"]))
    return new_p, {"exp_avg": torch.where(first, st["exp_avg"], m), "exp_avg_sq": new_sq}
