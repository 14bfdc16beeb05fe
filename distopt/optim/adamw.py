"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019), sharing Adam's maths."""

from __future__ import annotations

from typing import Any

from distopt.optim._hyper import KW_ONLY, HyperSpec, adam_hypers, flag
from distopt.optim.adam import AdamFamily

__all__ = ["AdamW"]


class AdamW(AdamFamily):
    r"""AdamW with decoupled weight decay.

    Update rule for step ``t`` (``g`` the gradient, all operations element-wise)::

        p  <- p * (1 - lr * weight_decay)                 # decoupled decay, before the update
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        v' <- max(v', v)  if amsgrad else v
        p  <- p - lr / (1 - beta1^t) * m / (sqrt(v' / (1 - beta2^t)) + eps)

    With ``correct_bias=False`` the two bias corrections are 1.  ``transformers_order=True``
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

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq`` (fp32 for bf16/fp16 parameters).  With the default arithmetic
    the update runs in torch's fused multi-tensor AdamW kernel.  The maths is
    :class:`~distopt.optim.adam.AdamFamily`'s, shared with :class:`~distopt.optim.Adam`.
    """

    hypers = HyperSpec(
        *adam_hypers(1e-3, weight_decay_default=1e-2),
        flag("amsgrad", False),
        KW_ONLY,
        flag("maximize", False),
        flag("correct_bias", True),
        flag("transformers_order", False),
    )

    def _arithmetic(self, group: dict[str, Any]) -> tuple[bool, bool, bool]:
        return True, bool(group["correct_bias"]), bool(group["transformers_order"])
