"""The private DeepSpeed attributes distopt uses, in one place, behind a version check.

DeepSpeed has no public way to scale the gradients of a window by a factor known only at its
boundary (distopt's ``world_size / global item count``): its engine divides by its own
``gradient_accumulation_steps`` at backward time.  Its ZeRO optimizers divide the gradients by
their loss scale before clipping and stepping, and take an external loss scale when
``custom_loss_scaler`` is set (the attributes ``custom_loss_scaler``, ``external_loss_scale``,
``loss_scale`` of ``DeepSpeedZeroOptimizer`` / ``DeepSpeedZeroOptimizer_Stage3``): setting that
scale to ``loss_scale / factor`` for one step multiplies the gradients by ``factor`` before the
clip, which is what distopt's accumulator needs.  ``tests/test_private_apis.py`` fails loudly
when a DeepSpeed release changes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["TESTED", "can_scale_gradients", "check_version", "gradients_scaled_by"]

log = logging.getLogger("distopt.integrations.deepspeed")

#: the DeepSpeed versions these attributes were checked against (major, minor)
TESTED = ((0, 14), (0, 19))
_ATTRS = ("custom_loss_scaler", "external_loss_scale", "loss_scale")
_checked: bool | None = None


def check_version() -> bool:
    """Whether the installed DeepSpeed is in the tested range; logs a warning (once) if not."""
    global _checked
    if _checked is None:
        import deepspeed

        version = deepspeed.__version__
        parts = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
        _checked = len(parts) == 2 and TESTED[0] <= parts <= TESTED[1]
        if not _checked:
            log.warning(
                "distopt: DeepSpeed %s is outside the range distopt's use of its ZeRO optimizer's "
                "loss-scale attributes was tested on (%d.%d to %d.%d)",
                version,
                *TESTED[0],
                *TESTED[1],
            )
    return _checked


def can_scale_gradients(opt: Any) -> bool:
    """Whether ``opt`` (DeepSpeed's ZeRO optimizer) has the external loss-scale attributes."""
    return all(hasattr(opt, a) for a in _ATTRS)


@contextmanager
def gradients_scaled_by(opt: Any, factor: float) -> Iterator[None]:
    """Inside, ``opt``'s next step multiplies the gradients by ``factor`` before clipping."""
    check_version()
    saved = (opt.custom_loss_scaler, opt.external_loss_scale)
    opt.custom_loss_scaler, opt.external_loss_scale = True, float(opt.loss_scale) / factor
    try:
        yield
    finally:
        opt.custom_loss_scaler, opt.external_loss_scale = saved
