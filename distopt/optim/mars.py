"""MARS: variance-reduced preconditioned gradients (Yuan et al., 2024, "MARS: Unleashing the
Power of Variance Reduction for Training Large Models", arXiv:2411.10438), timm's options."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._cautious import cautious_masks
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, betas, flag, lr, nonneg, option
from distopt.optim._rule_guard import scaled_update

__all__ = ["Mars"]

#: parts of a tensor the sums pass of ``||c||`` reads at once (see :func:`_interleaved_squares`)
SUMS_SPLIT = 4


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

    # torch.amp.GradScaler: see distopt.optim._kernel (caution=True: distopt.optim._rule_guard)
    _step_supports_amp_scaling = True

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

    def statistics_reads(self, group: dict[str, Any]) -> frozenset[str] | None:
        """What the whole-tensor statistics of ``group`` read (for ``distopt bench step``'s
        bytes per parameter): the norm of ``c`` needs only the gradient and ``last_grad``;
        with ``caution`` the mask's mean needs the update, so everything (``None``)."""
        return None if group["caution"] else frozenset({"grad", "last_grad"})

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        mars = [v for v in views if group["optimize_1d"] or len(v.shape) >= 2]
        rest = [v for v in views if not (group["optimize_1d"] or len(v.shape) >= 2)]
        # fixed order of reductions on every rank: MARS norms, MARS caution, AdamW caution
        if group["caution"]:  # the mask follows the norm: two dependent whole-tensor sums
            states = ("exp_avg", "exp_avg_sq", "last_grad")
            scaled_update(self, mars, states, lambda vs: self._mars(group, vs, ctx))
        else:
            self._apply(group, mars, ctx, normed=True)
        self._apply(group, rest, ctx, normed=False)

    def _apply(
        self, group: dict[str, Any], views: list[ParamView], ctx: StepContext, normed: bool
    ) -> None:
        """One :func:`~distopt.optim._kernel.apply` of :func:`mars_rule`: MARS (``normed``,
        the norm of ``c`` one sums pass) or the AdamW of the other parameters."""
        if not views:
            return
        beta1, beta2 = group["betas"] if normed else group["betas_1d"]
        lr = float(group["lr"]) * (1.0 if normed else group["lr_1d_factor"])
        wd, vr = group["weight_decay"], group["gamma"] * beta1 / (1.0 - beta1)
        caution = bool(group["caution"]) and not normed

        def at(t: float) -> dict[str, float]:
            return {
                "beta1": beta1, "beta2": beta2, "eps": group["eps"], "wd": wd, "neg_lr": -lr,
                "inv_bc1": 1.0 / (1.0 - beta1**t), "inv_bc2_sqrt": 1.0 / math.sqrt(1.0 - beta2**t),
                "vr": 0.0 if t == 1.0 else vr,
            }  # fmt: skip

        # one mapping per distinct step (views of equal scalars share kernel calls); the
        # cautious mask's mean needs each tensor's size
        shared: dict[float, dict[str, float]] = {}
        scalars = [
            {**at(t), "numel": float(v.numel)}
            if caution
            else shared.get(t) or shared.setdefault(t, at(t))
            for v, t in zip(views, F.advance_steps(views))
        ]
        states = ("exp_avg", "last_grad", "exp_avg_sq")
        K.apply(
            self, mars_rule, views, states, scalars, ctx=ctx,
            sums=("c_sq",) if normed else K.CAUTION_SUMS if caution else (),
            normed=normed, lion=normed and group["mars_type"] == "lion", caution=caution,
            decay=wd != 0.0, **({"split": SUMS_SPLIT} if normed else {}),
        )  # fmt: skip

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
        for v in views:
            v.state["last_grad"].copy_(v.grad)


def mars_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    normed: bool,
    lion: bool,
    caution: bool,
    decay: bool,
    split: int = 1,
    phase: str = "update",
) -> Any:
    """MARS's update of one tensor (see :class:`Mars`): ``normed`` (MARS proper: ``c`` from
    this and the last gradient, divided by ``max(||c||, 1)``, ``s["c_sq"]`` its whole-tensor
    sum of squares) or the AdamW of the other parameters (``c = g``, optionally cautious).
    ``split``: parts of a flat tensor its sums pass reads at once (see
    :func:`_interleaved_squares`)."""
    if normed and caution:
        raise ValueError("mars_rule: caution after the norm needs two dependent sums passes")
    c = g
    if normed:
        c = (g - st["last_grad"]) * s["vr"] + g  # s["vr"] = 0 at the first step: c = g
        if phase == "sums":
            return {"c_sq": _interleaved_squares(c, split)}
        c = c * (1.0 / torch.clamp(torch.sqrt(s["c_sq"]), min=1.0))  # one per-tensor division
    m = st["exp_avg"] * s["beta1"] + c * (1.0 - s["beta1"])
    num = m
    if caution:
        if phase == "sums":
            return K.agreement(m, g)
        num = K.cautious(m, g, s)
    new = {"exp_avg": m, "last_grad": g}
    if lion:
        u = torch.sign(num)
    else:
        v = K.ema_sq(st["exp_avg_sq"], c, s["beta2"])
        new["exp_avg_sq"] = v
        # the bias corrections as host reciprocals: one division per element (compiled loops
        # divide at a fraction of the memory rate)
        u = (num * s["inv_bc1"]) / (v.sqrt() * s["inv_bc2_sqrt"] + s["eps"])
    if decay:
        u = u + p * s["wd"]
    return p + u * s["neg_lr"], new


def _interleaved_squares(c: Tensor, split: int) -> Tensor:
    """Values whose whole-tensor sum is ``||c||^2``.

    In a compiled kernel, for a flat ``c`` of ``n >= split`` elements: the squares (float64)
    of its ``split`` parts of ``q = n // split`` elements added element-wise, plus the last
    ``q`` elements' squares where they lie past ``split * q`` (the ``n % split`` rest: no graph
    per remainder, no second sum).  The same sum as ``c * c``'s (float64 accumulation, in
    another order).  The compiled sums loop then reads ``split`` places of the gradient and of
    the last gradient at once instead of one (the rest's window shares their cache lines): a
    read-only pass over two tensors reaches a fraction of the memory rate from one stream each
    (ViT-S's 50 matrices, 1 thread, loaded: 23.5 ms at 7.5 GB/s, 17.4 ms with 4 parts).
    Otherwise (eager, chunked temporaries; a 2-D stack of small tensors, one per row) ``c * c``."""
    sq = c * c
    if split <= 1 or c.dim() != 1 or c.shape[0] < split or not torch.compiler.is_compiling():
        return sq
    n = c.shape[0]
    q = n // split
    out = sq[:q].double()
    for i in range(1, split):
        out = out + sq[i * q : (i + 1) * q].double()
    past = torch.arange(q, device=c.device) >= split * q + q - n  # the last n - split * q
    return out + torch.where(past, sq[n - q :], 0.0).double()
