"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019), sharing Adam's maths;
timm's cautious (arXiv:2411.16085) and corrected-decay (arXiv:2506.02285) options."""

from __future__ import annotations

from typing import Any

from distopt.optim._core import ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, adam_hypers, flag, with_max_lr_snapshot
from distopt.optim.adam import AdamFamily, adam_update

__all__ = ["AdamW"]


class AdamW(AdamFamily):
    r"""AdamW with decoupled weight decay.

    Update rule for step ``t`` (``g`` the gradient, all operations element-wise)::

        p  <- p * (1 - lr * weight_decay)                 # decoupled decay, before the update
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        v' <- max(v', v)  if amsgrad else v
        p  <- p - lr / (1 - beta1^t) * m / (sqrt(v' / (1 - beta2^t)) + eps)

    With ``caution`` (timm's ``cadamw``) the first moment in the last line is multiplied by the
    cautious mask ``1[m * g > 0] / max(mean, 1e-3)`` (the mean over the whole tensor: one batched
    reduction when sharded); with ``corrected_weight_decay`` (``adamc``) the decay is
    ``p <- p * (1 - lr^2 / max_lr * weight_decay)``, ``max_lr`` being the constructor's lr
    (``max_lr_snapshot`` in the groups).  Neither combines with ``correct_bias=False`` or
    ``transformers_order``.  With ``correct_bias=False`` the two bias corrections are 1.  ``transformers_order=True``
    reproduces the legacy ``transformers.AdamW`` arithmetic: ``eps`` is added to ``sqrt(v)``
    before the bias correction is applied to the step size, and the decay ``p <- p - lr * wd * p``
    is applied *after* the Adam update.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the running averages (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2).
        amsgrad: use the AMSGrad maximum of the second moment (default False).
        maximize: maximize the objective instead of minimizing it (default False).
        correct_bias: apply Adam's bias corrections (default True).
        transformers_order: legacy transformers arithmetic, see above (default False).
        caution: the cautious mask, see above (default False).
        corrected_weight_decay: decay scaled by ``lr / max_lr``, see above (default False).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq`` (fp32 for bf16/fp16 parameters).  With the default arithmetic
    the update runs in torch's fused multi-tensor AdamW kernel (not with ``caution`` or
    ``corrected_weight_decay``).  The maths is
    :class:`~distopt.optim.adam.AdamFamily`'s, shared with :class:`~distopt.optim.Adam`.
    """

    hypers = HyperSpec(
        *adam_hypers(1e-3, weight_decay_default=1e-2),
        flag("amsgrad", False),
        KW_ONLY,
        flag("maximize", False),
        flag("correct_bias", True),
        flag("transformers_order", False),
        flag("caution", False),
        flag("corrected_weight_decay", False),
    )

    def _arithmetic(self, group: dict[str, Any]) -> tuple[bool, bool, bool]:
        return True, bool(group["correct_bias"]), bool(group["transformers_order"])

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if (hypers["caution"] or hypers["corrected_weight_decay"]) and (
            hypers["transformers_order"] or not hypers["correct_bias"]
        ):
            raise ValueError(
                "AdamW: caution / corrected_weight_decay (timm's AdamWLegacy options) need the "
                "default arithmetic: correct_bias=True, transformers_order=False"
            )
        return params, with_max_lr_snapshot(hypers)

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        return bool(group.get("caution"))

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not (group.get("caution") or group.get("corrected_weight_decay")):
            super()._update(group, views, ctx)  # AdamFamily's (torch's fused kernel when it can)
            return
        _timm_options_update(self, group, views, ctx)


def _timm_options_update(
    opt: AdamW, group: dict[str, Any], views: list[ParamView], ctx: StepContext
) -> None:
    """AdamW with the cautious mask and / or the corrected decay (see :class:`AdamW`)."""
    if not views:
        return
    lr = float(group["lr"])
    decay_lr = lr * lr / group["max_lr_snapshot"] if group["corrected_weight_decay"] else None
    adam_update(
        opt, ctx, group, views, decoupled=True, decay_lr=decay_lr, caution=bool(group["caution"])
    )
