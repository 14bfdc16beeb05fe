"""Learning-rate schedules: pure ``lr(step)`` functions and resumable ``LRScheduler``s.

Every schedule is a ``torch.optim.lr_scheduler.LRScheduler`` subclass built from a
module-level function (so it pickles), exposes a pure ``lr_at(step)``, resumes exactly from
``state_dict()`` or from ``last_epoch``, and counts optimizer steps.  The names, formulas and
defaults are those of ``transformers.optimization``.  See docs/schedules.md.

``last_epoch`` means what it means in torch and transformers: the constructor takes one step,
so ``last_epoch=-1`` is a fresh start (step 0) and ``last_epoch=N`` lands on step ``N + 1``.
After ``k`` optimizer steps, resume with ``last_epoch=k - 1``.  Unlike torch, a missing
``initial_lr`` in the param groups is no error (see ``_base`` for the recovery order).

Modules: ``_functions`` (pure lr functions), ``_base`` (the scheduler base classes),
``_factories`` (the ``get_*`` factories), ``_adafactor`` and ``_plateau`` (the two schedules
that are not a function of the step alone), ``_registry`` (schedules by name).
``accelerator_kwargs`` and ``step_scheduler`` live in :mod:`distopt.integrations.schedule_stepping`
and are re-exported here on first access.
"""

from typing import Any

from distopt.schedules._adafactor import AdafactorSchedule, get_adafactor_schedule
from distopt.schedules._base import LambdaSchedule, StepSchedule, WarmUp
from distopt.schedules._factories import (
    create_tf_style_schedule,
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_inverse_sqrt_schedule,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
    get_wsd_schedule,
)
from distopt.schedules._functions import (
    DECAY_TYPES,
    WARMUP_TYPES,
    adafactor_relative_step_lr,
    constant_factor,
    constant_with_warmup_factor,
    cosine_with_hard_restarts_factor,
    cosine_with_min_lr_factor,
    cosine_with_warmup_factor,
    inverse_sqrt_factor,
    linear_with_warmup_factor,
    polynomial_decay_lr,
    polynomial_decay_with_warmup_factor,
    tf_style_lr,
    warmup_then,
    wsd_factor,
)
from distopt.schedules._plateau import ReduceLROnPlateauSchedule, get_reduce_on_plateau_schedule
from distopt.schedules._registry import (
    EXTRA_SCHEDULES,
    TRANSFORMERS_NAMES,
    TYPE_TO_SCHEDULER_FUNCTION,
    SchedulerType,
    get_scheduler,
    list_schedules,
    scheduler_kwargs,
)

__all__ = [
    "DECAY_TYPES",
    "EXTRA_SCHEDULES",
    "TRANSFORMERS_NAMES",
    "TYPE_TO_SCHEDULER_FUNCTION",
    "WARMUP_TYPES",
    "AdafactorSchedule",
    "LambdaSchedule",
    "ReduceLROnPlateauSchedule",
    "SchedulerType",
    "StepSchedule",
    "WarmUp",
    "accelerator_kwargs",
    "adafactor_relative_step_lr",
    "constant_factor",
    "constant_with_warmup_factor",
    "cosine_with_hard_restarts_factor",
    "cosine_with_min_lr_factor",
    "cosine_with_warmup_factor",
    "create_tf_style_schedule",
    "get_adafactor_schedule",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_inverse_sqrt_schedule",
    "get_linear_schedule_with_warmup",
    "get_polynomial_decay_schedule_with_warmup",
    "get_reduce_on_plateau_schedule",
    "get_scheduler",
    "get_wsd_schedule",
    "inverse_sqrt_factor",
    "linear_with_warmup_factor",
    "list_schedules",
    "polynomial_decay_lr",
    "polynomial_decay_with_warmup_factor",
    "scheduler_kwargs",
    "step_scheduler",
    "tf_style_lr",
    "warmup_then",
    "wsd_factor",
]

_STEPPING = ("accelerator_kwargs", "step_scheduler")


def __getattr__(name: str) -> Any:
    """``accelerator_kwargs`` / ``step_scheduler``, from the integrations layer, on first use."""
    if name in _STEPPING:
        from distopt.integrations import schedule_stepping

        value = getattr(schedule_stepping, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_STEPPING))
