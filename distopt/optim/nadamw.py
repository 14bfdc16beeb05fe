"""NAdamW: Adam with Nesterov momentum and decoupled weight decay (Dozat, 2016; the form of
Table 1 of arXiv:1910.05446), with the cautious option (arXiv:2411.16085)."""

from __future__ import annotations

from typing import Any

from distopt.optim._adam_like import adam_like_update_
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import (
    KW_ONLY,
    HyperSpec,
    betas,
    flag,
    lr,
    nonneg,
    option,
    with_max_lr_snapshot,
)

__all__ = ["NAdamW"]


def _no_clipping(name: str, value: Any) -> Any:
    if value is not None:
        raise NotImplementedError(
            f"{name}={value!r} (StableAdamW update clipping) is not implemented by distopt's NAdamW; use None"
        )
    return value


class NAdamW(DistOptimizer):
    r"""NAdamW, with timm's options and defaults (names ``nadamw``, ``cnadamw``, ``nadamc``).

    Update rule for step ``t`` (element-wise; the cautious mask's mean is over the whole tensor)::

        p <- p * (1 - s * weight_decay)          (s = lr, or lr^2 / max_lr with corrected_weight_decay)
        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        n  = beta1 m + (1 - beta1) g             (the moment one step ahead: Nesterov)
        n <- n * cautious mask(n, g)             if caution
        p <- p - lr / (1 - beta1^t) * n / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: moment coefficients (default (0.9, 0.999)).
        eps: denominator term (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2).
        caution: the cautious mask (default False).
        corrected_weight_decay: decay by ``lr^2 / max_lr`` (default False).
        maximize: maximize the objective (default False).
        clipping_threshold: timm's StableAdamW clipping; only None (default).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    elementwise = True
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    hypers = HyperSpec(
        lr(1e-3),
        betas((0.9, 0.999)),
        nonneg("eps", 1e-8),
        nonneg("weight_decay", 1e-2),
        flag("caution", False),
        flag("corrected_weight_decay", False),
        flag("maximize", False),
        KW_ONLY,
        option("clipping_threshold", None, "float | None", _no_clipping),
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
        beta1, beta2 = group["betas"]
        adam_like_update_(
            ctx, views, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], nesterov=True, caution=group["caution"],
            max_lr=group["max_lr_snapshot"] if group["corrected_weight_decay"] else None,
            maximize=group["maximize"], opt=self,
        )  # fmt: skip
