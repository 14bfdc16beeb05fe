"""RMSpropTF: RMSprop with TensorFlow's arithmetic (as used to train EfficientNet / MobileNet)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, flag, lr, nonneg, with_max_lr_snapshot

__all__ = ["RMSpropTF"]


class RMSpropTF(DistOptimizer):
    r"""RMSprop with TensorFlow's conventions, options and defaults of timm's ``RMSpropTF``.

    Differences to ``torch.optim.RMSprop``: ``eps`` is added *inside* the square root, the
    running average ``square_avg`` starts at ones, and by default the learning rate is
    accumulated in the momentum buffer.  Update rule (element-wise, ``a = alpha``)::

        decay:  p <- p * (1 - s * wd)   if decoupled_decay    (s = lr, or lr^2 / max_lr if
                                                                corrected_weight_decay)
                g <- g + wd * p         otherwise (L2 penalty)
        v  <- v + (1 - a) * (g^2 - v)
        centered:  c <- c + (1 - a) * (g - c);  d = sqrt(v - c^2 + eps)
        otherwise: d = sqrt(v + eps)
        momentum > 0, lr_in_momentum:  b <- momentum * b + lr * g / d;  p <- p - b
        momentum > 0, otherwise:       b <- momentum * b + g / d;       p <- p - lr * b
        momentum == 0:                 p <- p - lr * g / d

    With ``caution`` (momentum > 0 only) the buffer entering the parameter update (not the
    stored one) is masked where its sign disagrees with the gradient and rescaled by the
    inverse fraction kept over the whole tensor (see :func:`cautious`; one batched reduction per
    step under sharding, the only communication this optimizer needs).

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-2).
        alpha: smoothing constant of the running averages (default 0.9).
        eps: term added inside the square root (default 1e-10).
        weight_decay: weight decay (default 0).
        momentum: momentum factor (default 0).
        centered: normalise by an estimate of the gradient's variance (default False).
        decoupled_decay: decay the weights directly instead of adding ``wd * p`` to the gradient
            (default False).
        corrected_weight_decay: with ``decoupled_decay``, scale the decay by ``lr^2 / max_lr``
            where ``max_lr`` is the constructor's lr (kept as ``max_lr_snapshot`` in the param
            groups) (default False).
        lr_in_momentum: accumulate the lr-scaled update in the momentum buffer, as TensorFlow does
            (default True).
        caution: cautious masking of the momentum update (default False).

    State per parameter: ``step`` (float32 scalar), ``square_avg`` (initialised to ones),
    ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered); fp32 for bf16/fp16 parameters.
    """

    elementwise = True  # unless caution=True (see needs_whole_tensors)
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        """Caution rescales by the fraction of agreeing signs over each whole tensor."""
        return bool(group.get("caution")) and group.get("momentum", 0.0) > 0

    hypers = HyperSpec(
        lr(1e-2),
        nonneg("alpha", 0.9, at_most=1.0),
        nonneg("eps", 1e-10),
        nonneg("weight_decay", 0.0),
        nonneg("momentum", 0.0),
        flag("centered", False),
        flag("decoupled_decay", False),
        flag("corrected_weight_decay", False),
        flag("lr_in_momentum", True),
        flag("caution", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    _zero_state = (("momentum_buffer", "momentum"), ("grad_avg", "centered"))

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        super()._init_state(group, view)
        view.state["square_avg"] = torch.ones_like(view.data, memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        wd, momentum = group["weight_decay"], group["momentum"]
        decoupled = bool(group["decoupled_decay"])
        scale = lr**2 / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
        F.advance_steps(views)
        in_buf = bool(group["lr_in_momentum"])
        scalars = {"lr": lr, "wd": wd, "decay": 1.0 - scale * wd, "alpha": group["alpha"],
                   "eps": group["eps"], "momentum": momentum, "in_size": lr if in_buf else 1.0,
                   "out_size": 1.0 if in_buf else lr}  # fmt: skip
        caution = bool(group["caution"]) and momentum > 0
        states = ("square_avg",) + (("momentum_buffer",) if momentum > 0 else ())
        states += ("grad_avg",) if group["centered"] else ()
        K.apply(self, rmsprop_tf_rule, views, states, [{**scalars, "numel": float(v.numel)} for v in views],
                ctx=ctx, sums=K.CAUTION_SUMS if caution else (), caution=caution, momentum=momentum > 0,
                centered=bool(group["centered"]), decoupled=decoupled and wd != 0.0,
                l2=not decoupled and wd != 0.0)  # fmt: skip


def rmsprop_tf_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    caution: bool,
    momentum: bool,
    centered: bool,
    decoupled: bool,
    l2: bool,
    phase: str = "update",
) -> Any:
    """RMSpropTF's update of one tensor (see :class:`RMSpropTF`)."""  # fmt: skip
    if decoupled:
        p = p * s["decay"]
    if l2:
        g = g + s["wd"] * p
    sq = torch.lerp(st["square_avg"], g * g, 1.0 - s["alpha"])
    new = {"square_avg": sq}
    if centered:
        ga = torch.lerp(st["grad_avg"], g, 1.0 - s["alpha"])
        new["grad_avg"] = ga
        denom = (sq - ga * ga + s["eps"]).sqrt()
    else:
        denom = (sq + s["eps"]).sqrt()
    if not momentum:
        return p - (s["lr"] * g) / denom, new
    b = st["momentum_buffer"] * s["momentum"] + (s["in_size"] * g) / denom
    new["momentum_buffer"] = b
    u = b
    if caution:
        if phase == "sums":
            return K.agreement(u, g)
        u = K.cautious(u, g, s)
    return torch.addcmul(p, u, -s["out_size"]), new
