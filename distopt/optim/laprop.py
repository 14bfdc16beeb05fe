"""LaProp: Adam with the momentum taken of the normalised gradient (Ziyin et al., 2020,
"LaProp: Separating Momentum and Adaptivity in Adam", arXiv:2002.04839), timm's options."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, betas, flag, lr, nonneg, with_max_lr_snapshot

__all__ = ["LaProp"]


class LaProp(DistOptimizer):
    r"""LaProp, with timm's options and defaults (names ``laprop``, ``claprop``).

    Update rule (element-wise; the cautious mask's mean is over the whole tensor)::

        c1 <- beta1 c1 + (1 - beta1) lr;   c2 <- beta2 c2 + (1 - beta2)    (bias corrections)
        v  <- beta2 v + (1 - beta2) g^2
        m  <- beta1 m + (1 - beta1) lr * g / (sqrt(v / c2) + eps)
        p  <- p - (lr / c1) * m              (m * cautious mask(m, g) if caution)
        p  <- p * (1 - s * weight_decay)      (after the step; s = lr, or lr^2 / max_lr)

    Args:
        params: parameters or param groups.
        lr: learning rate (default 4e-4).
        betas: moment coefficients (default (0.9, 0.999)).
        eps: denominator term (default 1e-15).
        weight_decay: decoupled weight decay (default 0).
        caution: the cautious mask (default False).
        corrected_weight_decay: decay by ``lr^2 / max_lr`` (default False).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``exp_avg_lr_1`` (the
    lr-weighted bias correction, so a changing lr is corrected exactly) and ``exp_avg_lr_2``
    (Python floats, as in timm; replicated).
    """

    elementwise = True

    hypers = HyperSpec(
        lr(4e-4),
        betas((0.9, 0.999)),
        nonneg("eps", 1e-15),
        nonneg("weight_decay", 0.0),
        flag("caution", False),
        flag("corrected_weight_decay", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        return bool(group["caution"])

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["exp_avg"] = self._zeros(view)
        view.state["exp_avg_lr_1"] = 0.0
        view.state["exp_avg_lr_2"] = 0.0
        view.state["exp_avg_sq"] = self._zeros(view)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        F.advance_steps(views)
        wd = group["weight_decay"]
        s = lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
        scalars = []
        for v in views:  # Python floats (as timm): exact in double, kept as is by state_dict
            v.state["exp_avg_lr_1"] = c1 = v.state["exp_avg_lr_1"] * beta1 + (1.0 - beta1) * lr
            v.state["exp_avg_lr_2"] = c2 = v.state["exp_avg_lr_2"] * beta2 + (1.0 - beta2)
            scalars.append(
                {
                    "beta1": beta1,
                    "beta2": beta2,
                    "c2": c2,
                    "eps": group["eps"],
                    "in_size": lr * (1.0 - beta1),
                    "size": -(lr / c1) if c1 != 0.0 else 0.0,
                    "decay": 1.0 - s * wd if wd != 0.0 else 1.0,
                    "numel": float(v.numel),
                }
            )
        caution = bool(group["caution"])
        K.apply(
            self,
            laprop_rule,
            views,
            ("exp_avg", "exp_avg_sq"),
            scalars,
            ctx=ctx,
            sums=K.CAUTION_SUMS if caution else (),
            caution=caution,
        )


def laprop_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    caution: bool,
    phase: str = "update",
) -> Any:
    """LaProp's update of one tensor (see :class:`LaProp`)."""
    v = K.ema_sq(st["exp_avg_sq"], g, s["beta2"])
    m = st["exp_avg"] * s["beta1"] + s["in_size"] * (g / ((v / s["c2"]).sqrt() + s["eps"]))
    u = m
    if caution:
        if phase == "sums":
            return K.agreement(u, g)
        u = K.cautious(u, g, s)
    return (p + s["size"] * u) * s["decay"], {"exp_avg": m, "exp_avg_sq": v}
