"""The private Accelerate APIs distopt uses, in one place, each behind a version check.

Accelerate has no public way to

* set ``GradientState.sync_gradients`` from outside ``accelerator.accumulate`` (distopt's
  accumulator decides the boundaries and Accelerate's prepared optimizer, scheduler and
  ``zero_grad`` must follow them): ``GradientState._set_sync_gradients``;
* list the models an accelerator holds (to forget distopt pairs after ``free_memory``):
  ``Accelerator._models``;
* hand ``accelerator.prepare`` an object that is already prepared (a ZeRO-sharded model that must
  not be wrapped in DDP, an ``AcceleratedOptimizer`` subclass whose ``state_dict`` writes a marker
  during ``save_state``): the ``_is_accelerate_prepared`` flag ``prepare`` itself sets and honours.

``tests/test_private_apis.py`` fails loudly when an Accelerate release changes one of these.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("distopt.integrations.accelerate")
_checked: bool | None = None

__all__ = ["TESTED", "check_version", "held_models", "mark_prepared", "set_sync_gradients"]

#: the Accelerate versions these private APIs were checked against (major, minor)
TESTED = ((1, 0), (1, 15))


def check_version() -> bool:
    """Whether the installed Accelerate is in the tested range; logs a warning (once) if not.

    Outside the range the helpers still try, and raise a clear RuntimeError when an attribute is
    gone; ``tests/test_private_apis.py`` is what fails loudly on a changed release.
    """
    global _checked
    if _checked is None:
        import accelerate

        version = accelerate.__version__
        parts = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
        _checked = len(parts) == 2 and TESTED[0] <= parts <= (TESTED[1][0], 99)
        if not _checked:
            log.warning(
                "distopt: Accelerate %s is outside the range distopt's use of its private APIs was "
                "tested on (%d.%d to %d.x)",
                version,
                *TESTED[0],
                TESTED[1][0],
            )
    return _checked


def set_sync_gradients(accelerator: Any, value: bool) -> None:
    """Set Accelerate's ``sync_gradients`` (what its optimizer, scheduler and zero_grad obey)."""
    check_version()
    state = accelerator.gradient_state
    setter = getattr(state, "_set_sync_gradients", None)
    if setter is None:
        raise RuntimeError(
            "distopt.integrations.accelerate: this Accelerate's GradientState has no "
            "_set_sync_gradients; distopt's GradientAccumulator cannot align the boundaries"
        )
    setter(bool(value))


def held_models(accelerator: Any) -> list[Any] | None:
    """The models ``accelerator`` holds (None when this Accelerate does not say)."""
    check_version()
    held = getattr(accelerator, "_models", None)
    return list(held) if held is not None else None


def mark_prepared(obj: Any) -> Any:
    """Make ``accelerator.prepare`` register ``obj`` as it is instead of wrapping it again."""
    check_version()
    obj._is_accelerate_prepared = True
    return obj
