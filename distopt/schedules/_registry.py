"""Schedules by name: one registry entry per name, and what is derived from it.

:data:`REGISTRY` holds, for each :class:`SchedulerType` name, its factory and which step
counts :func:`get_scheduler` must be given; ``TYPE_TO_SCHEDULER_FUNCTION``,
:func:`scheduler_kwargs`, :func:`get_scheduler`, :func:`list_schedules` and
:data:`TRANSFORMERS_NAMES` (the names ``distopt.compat.transformers`` re-exports) are all read
from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from distopt.schedules import _checks as C
from distopt.schedules import _factories as G
from distopt.schedules._plateau import ReduceLROnPlateauSchedule, get_reduce_on_plateau_schedule


class SchedulerType(str, Enum):
    """Names accepted by :func:`get_scheduler` (the transformers ``lr_scheduler_type`` ones)."""

    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    INVERSE_SQRT = "inverse_sqrt"
    REDUCE_ON_PLATEAU = "reduce_lr_on_plateau"
    COSINE_WITH_MIN_LR = "cosine_with_min_lr"
    WARMUP_STABLE_DECAY = "warmup_stable_decay"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _missing_(cls, value: object) -> SchedulerType:
        raise ValueError(
            f"unknown scheduler {value!r}; valid names: {', '.join(m.value for m in cls)}"
        )


@dataclass(frozen=True)
class ScheduleEntry:
    """What :func:`get_scheduler` knows about one schedule name."""

    factory: Callable[..., LRScheduler]
    #: ``num_warmup_steps`` must be given
    needs_warmup: bool
    #: ``num_training_steps`` must be given
    needs_total: bool


_T = SchedulerType
#: one entry per :class:`SchedulerType` name (the only place the names meet their factories)
REGISTRY: dict[SchedulerType, ScheduleEntry] = {
    _T.LINEAR: ScheduleEntry(G.get_linear_schedule_with_warmup, True, True),
    _T.COSINE: ScheduleEntry(G.get_cosine_schedule_with_warmup, True, True),
    _T.COSINE_WITH_RESTARTS: ScheduleEntry(
        G.get_cosine_with_hard_restarts_schedule_with_warmup, True, True
    ),
    _T.POLYNOMIAL: ScheduleEntry(G.get_polynomial_decay_schedule_with_warmup, True, True),
    _T.CONSTANT: ScheduleEntry(G.get_constant_schedule, False, False),
    _T.CONSTANT_WITH_WARMUP: ScheduleEntry(G.get_constant_schedule_with_warmup, True, False),
    _T.INVERSE_SQRT: ScheduleEntry(G.get_inverse_sqrt_schedule, True, False),
    _T.REDUCE_ON_PLATEAU: ScheduleEntry(get_reduce_on_plateau_schedule, False, False),
    _T.COSINE_WITH_MIN_LR: ScheduleEntry(G.get_cosine_with_min_lr_schedule_with_warmup, True, True),
    # takes num_training_steps or scheduler_specific_kwargs["num_stable_steps"]
    _T.WARMUP_STABLE_DECAY: ScheduleEntry(G.get_wsd_schedule, True, False),
}
if set(REGISTRY) != set(SchedulerType):  # pragma: no cover - a name added in one place only
    raise ImportError(f"schedule registry and SchedulerType differ: {set(SchedulerType) ^ set(REGISTRY)}")

#: transformers' name for the same table
TYPE_TO_SCHEDULER_FUNCTION: dict[SchedulerType, Callable[..., LRScheduler]] = {
    t: e.factory for t, e in REGISTRY.items()
}

_FILLED = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch", "base_lrs"}
_PLATEAU_KWARGS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown",
                   "min_lr", "eps")

#: Names that :func:`list_schedules` shows besides the :class:`SchedulerType` ones.
EXTRA_SCHEDULES = ("adafactor", "warmup")

#: The names ``distopt.compat.transformers`` re-exports (transformers spells them so): the enum,
#: ``get_scheduler``, every registered factory, and the Adafactor / TF-side schedules.
TRANSFORMERS_NAMES: tuple[str, ...] = (
    "SchedulerType",
    "get_scheduler",
    *(e.factory.__name__ for e in REGISTRY.values()),
    "AdafactorSchedule",
    "get_adafactor_schedule",
    "WarmUp",
)


def scheduler_kwargs(name: str | SchedulerType) -> dict[str, Any]:
    """The ``scheduler_specific_kwargs`` schedule ``name`` accepts, with their defaults
    (``inspect.Parameter.empty`` for required ones)."""
    stype = SchedulerType(getattr(name, "value", name))
    if stype is _T.REDUCE_ON_PLATEAU:
        sig = inspect.signature(ReduceLROnPlateauSchedule.__init__)
        return {k: sig.parameters[k].default for k in _PLATEAU_KWARGS}
    sig = inspect.signature(REGISTRY[stype].factory)
    out: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.name not in _FILLED and p.kind is not inspect.Parameter.VAR_KEYWORD:
            out[p.name] = p.default
    if stype is _T.WARMUP_STABLE_DECAY:
        out.pop("num_training_steps", None)
    return out


def get_scheduler(
    name: str | SchedulerType,
    optimizer: Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    scheduler_specific_kwargs: Mapping[str, Any] | None = None,
    last_epoch: int = -1,
    *,
    base_lrs: C.BaseLRs = None,
) -> LRScheduler:
    """Build a schedule from its name (see :class:`SchedulerType`).

    ``num_warmup_steps`` is required by every schedule except ``constant`` and
    ``reduce_lr_on_plateau`` (which ignore both step counts); ``num_training_steps`` by
    ``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial`` and
    ``cosine_with_min_lr`` (``warmup_stable_decay`` takes it or ``num_stable_steps``).
    Steps are optimizer steps.  ``scheduler_specific_kwargs`` go to the schedule's factory;
    a name it does not take raises ``TypeError`` naming it.  ``last_epoch`` has torch's
    meaning: ``-1`` fresh, ``N >= 0`` lands on step ``N + 1`` (resume after ``k`` steps with
    ``last_epoch=k - 1``); ``base_lrs`` overrides the base lrs (not for
    ``reduce_lr_on_plateau``).
    """
    stype = SchedulerType(getattr(name, "value", name))
    C.check_optimizer(optimizer)
    kwargs = dict(scheduler_specific_kwargs or {})
    accepted = scheduler_kwargs(stype)
    bad = [k for k in kwargs if k not in accepted]
    if bad:
        raise TypeError(
            f"get_scheduler({stype.value!r}): unexpected scheduler_specific_kwargs "
            f"{', '.join(map(repr, bad))}; {stype.value!r} accepts "
            f"{', '.join(sorted(accepted)) or 'none'}"
        )
    missing = []
    entry = REGISTRY[stype]
    if entry.needs_warmup and num_warmup_steps is None:
        missing.append("num_warmup_steps")
    if entry.needs_total and num_training_steps is None:
        missing.append("num_training_steps")
    if stype is _T.WARMUP_STABLE_DECAY:
        if num_training_steps is None and kwargs.get("num_stable_steps") is None:
            missing.append("num_training_steps (or scheduler_specific_kwargs['num_stable_steps'])")
        if "num_decay_steps" not in kwargs:
            missing.append("scheduler_specific_kwargs['num_decay_steps']")
    if missing:
        raise ValueError(f"{stype.value!r} requires {' and '.join(missing)}")
    factory = entry.factory
    if stype is _T.REDUCE_ON_PLATEAU:
        if base_lrs is not None:
            raise TypeError("reduce_lr_on_plateau does not take base_lrs")
        return factory(optimizer, last_epoch=last_epoch, **kwargs)
    call: dict[str, Any] = {"last_epoch": last_epoch, "base_lrs": base_lrs, **kwargs}
    if entry.needs_warmup:
        call["num_warmup_steps"] = num_warmup_steps
    if entry.needs_total or (stype is _T.WARMUP_STABLE_DECAY and num_training_steps is not None):
        call["num_training_steps"] = num_training_steps
    return factory(optimizer, **call)


def list_schedules() -> list[str]:
    """Sorted names: those :func:`get_scheduler` accepts plus ``adafactor`` and ``warmup``."""
    return sorted([t.value for t in SchedulerType] + list(EXTRA_SCHEDULES))
