"""Lion: evolved sign momentum (Chen et al., 2023, "Symbolic Discovery of Optimization
Algorithms", arXiv:2302.06675), with the cautious option (arXiv:2411.16085)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, betas, flag, lr, nonneg, with_max_lr_snapshot

__all__ = ["Lion"]


class Lion(DistOptimizer):
    r"""Lion, with the options and defaults of timm's ``Lion`` (names ``lion``, ``clion``).

    Update rule (element-wise; the cautious mask's mean is over the whole tensor)::

        p <- p * (1 - s * weight_decay)          (s = lr, or lr^2 / max_lr with corrected_weight_decay)
        u  = sign(beta1 * m + (1 - beta1) * g)
        u <- u * 1[u * g > 0] / max(mean(1[u * g > 0]), 1e-3)      if caution
        p <- p - lr * u
        m <- beta2 * m + (1 - beta2) * g

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-4).
        betas: interpolation of the update and decay of the momentum (default (0.9, 0.99)).
        weight_decay: decoupled weight decay (default 0).
        caution: the cautious mask (default False).
        corrected_weight_decay: decay by ``lr^2 / max_lr``, ``max_lr`` the constructor's lr
            (kept as ``max_lr_snapshot``) (default False).
        maximize: maximize the objective (default False).

    State per parameter: ``exp_avg``.  Element-wise, exact under any sharding; with
    ``caution`` the mask's mean is one batched reduction.
    """

    elementwise = True
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1e-4),
        betas((0.9, 0.99)),
        nonneg("weight_decay", 0.0),
        flag("caution", False),
        flag("corrected_weight_decay", False),
        KW_ONLY,
        flag("maximize", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        return bool(group["caution"])

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["exp_avg"] = self._zeros(view)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        s = lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
        scalars = [
            {
                "lr": lr,
                "decay": 1.0 - s * wd if wd != 0.0 else 1.0,
                "beta1": beta1,
                "beta2": beta2,
                "numel": float(v.numel),
            }
            for v in views
        ]
        caution = bool(group["caution"])
        K.apply(
            self,
            lion_rule,
            views,
            ("exp_avg",),
            scalars,
            ctx=ctx,
            sums=K.CAUTION_SUMS if caution else (),
            maximize=bool(group["maximize"]),
            caution=caution,
        )


def lion_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    maximize: bool,
    caution: bool,
    phase: str = "update",
) -> Any:
    """Lion's update of one tensor (see :class:`Lion`)."""
    if maximize:
        g = -g
    u = torch.sign(torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"]))
    if caution:
        if phase == "sums":
            return K.agreement(u, g)
        u = K.cautious(u, g, s)
    return p * s["decay"] - s["lr"] * u, {"exp_avg": torch.lerp(st["exp_avg"], g, 1.0 - s["beta2"])}
