"""LRScheduler subclasses built from the pure functions of :mod:`._functions`.

Conventions shared by every schedule here (see docs/schedules.md):

* ``last_epoch`` means exactly what it means for ``torch.optim.lr_scheduler.LRScheduler``
  (and so for ``transformers.get_scheduler``): the constructor takes one implicit step.
  ``last_epoch=-1`` (the default) is a fresh start: ``last_epoch == 0``, lrs ``lrs_at(0)``.
  ``last_epoch=N`` (``N >= 0``) ends with ``last_epoch == N + 1`` and lrs ``lrs_at(N + 1)``.
  On a fresh scheduler ``last_epoch`` counts ``step()`` calls, i.e. optimizer steps taken.
  **Resume after ``k`` optimizer steps with ``last_epoch=k - 1``** (``-1`` when ``k == 0``),
  or with ``load_state_dict``.
* Base lrs (the lr each group is scheduled from), in order of precedence:
  1. the ``base_lrs`` argument (a sequence: one per group; a number: that value times the
     group's ``lr_scale``);
  2. the group's ``initial_lr`` (written by any earlier scheduler, saved in full optimizer
     checkpoints);
  3. on a fresh start (``last_epoch=-1``), the group's current ``lr``;
  4. on a resume (``last_epoch >= 0``) without ``initial_lr`` (e.g. param groups restored from a
     sharded checkpoint that dropped it): ``optimizer.defaults["lr"] * group.get("lr_scale", 1)``,
     with a warning if the group's current lr fits neither that base nor the lr scheduled for
     the step being resumed (``lrs_at(last_epoch + 1)``, what the saved optimizer holds).
  torch raises ``KeyError`` instead of 3./4. when ``initial_lr`` is missing on a resume.
  ``load_state_dict`` always restores the saved base lrs, so loading the scheduler's own
  state is exact whatever the optimizer lost.
* A group's ``lr_scale`` (layer decay) is applied once, by the optimizer factory, to the
  group's lr; schedulers (ours and torch's) then scale that base.  The lr of such a group is
  ``lr_at(step) * lr_scale``.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from distopt.schedules import _functions as F

__all__ = [
    "StepSchedule",
    "LambdaSchedule",
    "WarmUp",
    "AdafactorSchedule",
    "ReduceLROnPlateauSchedule",
    "SchedulerType",
    "get_scheduler",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_linear_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_polynomial_decay_schedule_with_warmup",
    "get_inverse_sqrt_schedule",
    "get_reduce_on_plateau_schedule",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_wsd_schedule",
    "get_adafactor_schedule",
    "create_tf_style_schedule",
    "list_schedules",
]

BaseLRs = float | Sequence[float] | None


# --------------------------------------------------------------------------- validation


def _steps(name: str, value: Any) -> int:
    """A non-negative whole number of steps (integral floats are accepted)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    else:
        if not math.isfinite(value) or not float(value).is_integer():
            raise ValueError(f"{name} must be a whole number of steps, got {value!r}")
        value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _real(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def _check_total(num_warmup_steps: int, num_training_steps: int) -> None:
    if num_training_steps < num_warmup_steps:
        raise ValueError(
            f"num_training_steps ({num_training_steps}) must be >= num_warmup_steps "
            f"({num_warmup_steps})"
        )


def _last_epoch(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"last_epoch must be an integer >= -1, got {value!r}")
    if value < -1:
        raise ValueError(f"last_epoch must be >= -1, got {value}")
    return int(value)


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")


def _as_float(x: Any) -> float | None:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x)
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    return None


def _reference_lr(optimizer: Optimizer) -> float:
    """The lr a group with ``lr_scale == 1`` is scheduled from: ``optimizer.defaults["lr"]``.

    Falls back to the first group's ``initial_lr`` (or ``lr``) when the optimizer has no
    numeric default lr (e.g. a relative-step Adafactor).
    """
    lr = _as_float(optimizer.defaults.get("lr"))
    if lr is not None:
        return lr
    for group in optimizer.param_groups:
        for key in ("initial_lr", "lr"):
            lr = _as_float(group.get(key))
            if lr is not None:
                return lr / float(group.get("lr_scale", 1.0))
    return 1.0


# --------------------------------------------------------------------------- base class


class StepSchedule(LRScheduler):
    """Base class: every group's lr is a pure function of the step and its base lr.

    Subclasses set their hyperparameters, then call ``StepSchedule.__init__``, and implement
    :meth:`lr_at` and :meth:`factor_at`.  The scheduler's own state (``state_dict``) is plain
    data: the step, the base lrs, the reference lr, and the hyperparameters for checking.

    Args:
        optimizer: the optimizer whose param groups are scheduled.
        last_epoch: torch's meaning: ``-1`` fresh start; ``N >= 0`` takes the implicit
            constructor step from ``N`` and lands on step ``N + 1`` (resume after ``k`` steps
            with ``last_epoch=k - 1``).
        base_lrs: override the base lrs (see the module docstring for the precedence rule).
    """

    name: str = "schedule"

    def __init__(self, optimizer: Optimizer, *, last_epoch: int = -1,
                 base_lrs: BaseLRs = None) -> None:
        _check_optimizer(optimizer)
        last_epoch = _last_epoch(last_epoch)
        if not hasattr(self, "config"):
            self.config: dict[str, Any] = {}
        self.ref_lr = _reference_lr(optimizer)
        bases = self._resolve_base_lrs(optimizer, last_epoch, base_lrs)
        for group, base in zip(optimizer.param_groups, bases):
            group["initial_lr"] = base
        # torch's constructor steps once: last_epoch=N lands on step N + 1 (-1 lands on 0).
        super().__init__(optimizer, last_epoch)

    # ---- the schedule -------------------------------------------------------------------

    def factor_at(self, step: int) -> float:
        """Multiplier of a group's base lr after ``step`` optimizer steps."""
        raise NotImplementedError

    def lr_at(self, step: int, group: int | None = None) -> float:
        """Learning rate after ``step`` optimizer steps.

        ``group=None`` gives the lr of a group whose base lr is the reference lr
        (``optimizer.defaults["lr"]``); ``group=i`` gives param group ``i``'s lr.
        Pure: reads nothing from the optimizer and changes nothing.
        """
        raise NotImplementedError

    def lrs_at(self, step: int) -> list[float]:
        """Learning rates of all param groups after ``step`` optimizer steps."""
        step = _steps("step", step)
        return self._lrs(step)

    def _lrs(self, step: int) -> list[float]:
        f = self.factor_at(step)
        return [base * f for base in self.base_lrs]

    def get_lr(self) -> list[float]:  # closed form: never depends on the previous lr
        return self._lrs(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self._lrs(self.last_epoch)

    # ---- base lrs -----------------------------------------------------------------------

    def _resolve_base_lrs(self, optimizer: Optimizer, last_epoch: int,
                          base_lrs: BaseLRs) -> list[float]:
        groups = optimizer.param_groups
        if base_lrs is not None:
            if isinstance(base_lrs, numbers.Real) and not isinstance(base_lrs, bool):
                return [float(base_lrs) * float(g.get("lr_scale", 1.0)) for g in groups]
            base_lrs = [float(b) for b in base_lrs]
            if len(base_lrs) != len(groups):
                raise ValueError(
                    f"base_lrs has {len(base_lrs)} values but the optimizer has "
                    f"{len(groups)} param groups"
                )
            return base_lrs
        out: list[float] = []
        for i, group in enumerate(groups):
            initial = _as_float(group.get("initial_lr"))
            if initial is not None:
                out.append(initial)
                continue
            current = _as_float(group.get("lr"))
            if last_epoch == -1:
                if current is None:
                    raise ValueError(f"param_groups[{i}] has no numeric 'lr'; pass base_lrs=")
                out.append(current)
                continue
            base = self.ref_lr * float(group.get("lr_scale", 1.0))
            if current is not None:
                # After k steps the saved optimizer holds lrs_at(k); the resume passes k - 1.
                scheduled = base * self.factor_at(last_epoch + 1)
                if not (math.isclose(current, base, rel_tol=1e-6, abs_tol=1e-12)
                        or math.isclose(current, scheduled, rel_tol=1e-6, abs_tol=1e-12)):
                    warnings.warn(
                        f"{type(self).__name__}: param_groups[{i}] has no 'initial_lr'; using "
                        f"optimizer.defaults['lr'] * lr_scale = {base:g} as its base lr, but its "
                        f"current lr {current:g} matches neither that base nor the scheduled lr "
                        f"{scheduled:g}. Pass base_lrs=... or load this scheduler's state_dict().",
                        stacklevel=4,
                    )
            out.append(base)
        return out

    # ---- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: step, base lrs, reference lr, hyperparameters (for checking)."""
        return {
            "schedule": self.name,
            "config": dict(self.config),
            "last_epoch": self.last_epoch,
            "base_lrs": [float(b) for b in self.base_lrs],
            "ref_lr": self.ref_lr,
            "_step_count": self._step_count,
            "_last_lr": list(self._last_lr),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the step and base lrs, and set the groups' lrs to the scheduled values.

        Also accepts the state of a torch ``LambdaLR`` (e.g. a scheduler made by
        ``transformers``): only ``last_epoch`` and ``base_lrs`` are used.  The hyperparameters
        come from the constructor; a mismatch with the saved ones is warned about.
        """
        missing = [k for k in ("last_epoch", "base_lrs") if k not in state_dict]
        if missing:
            raise ValueError(f"not a scheduler state_dict: missing {missing}")
        saved_name = state_dict.get("schedule")
        if saved_name is not None and saved_name != self.name:
            warnings.warn(
                f"loading the state of schedule {saved_name!r} into {self.name!r}", stacklevel=2
            )
        saved_cfg = state_dict.get("config")
        if saved_cfg is not None and dict(saved_cfg) != self.config:
            diff = sorted(k for k in set(saved_cfg) | set(self.config)
                          if saved_cfg.get(k) != self.config.get(k))
            warnings.warn(
                f"{self.name}: hyperparameters differ from the saved ones ({', '.join(diff)}); "
                "the constructor's values are used",
                stacklevel=2,
            )
        bases = [float(b) for b in state_dict["base_lrs"]]
        if len(bases) != len(self.optimizer.param_groups):
            raise ValueError(
                f"saved state has {len(bases)} base lrs but the optimizer has "
                f"{len(self.optimizer.param_groups)} param groups"
            )
        self.last_epoch = _last_epoch(int(state_dict["last_epoch"]))
        self.base_lrs = bases
        if "ref_lr" in state_dict:
            self.ref_lr = float(state_dict["ref_lr"])
        self._step_count = int(state_dict.get("_step_count", self._step_count))
        lrs = self._lrs(max(self.last_epoch, 0))
        for group, base, lr in zip(self.optimizer.param_groups, bases, lrs):
            group["initial_lr"] = base
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                         for g in self.optimizer.param_groups]

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({self.name}: {cfg}; last_epoch={self.last_epoch})"


class LambdaSchedule(StepSchedule):
    """A schedule given by a multiplier function of the step (the ``LambdaLR`` model).

    Group ``i`` gets ``base_lrs[i] * lr_lambda(step)``.  ``lr_lambda`` should be picklable
    (a module-level function or a ``functools.partial`` of one) for the scheduler to pickle.

    Args:
        optimizer: the optimizer to schedule.
        lr_lambda: multiplier as a function of the step.
        last_epoch: torch's meaning (``-1``: fresh; ``N``: lands on step ``N + 1``).
        base_lrs: base lr override (see module docs).
        name: schedule name (shown in ``repr`` and saved in ``state_dict``).
        config: hyperparameters, saved in ``state_dict`` and checked on load.
    """

    def __init__(self, optimizer: Optimizer, lr_lambda: Callable[[int], float], *,
                 last_epoch: int = -1, base_lrs: BaseLRs = None, name: str = "lambda",
                 config: Mapping[str, Any] | None = None) -> None:
        if not callable(lr_lambda):
            raise TypeError(f"lr_lambda must be callable, got {lr_lambda!r}")
        self.lr_lambda = lr_lambda
        self.name = name
        self.config = dict(config or {})
        super().__init__(optimizer, last_epoch=last_epoch, base_lrs=base_lrs)

    def factor_at(self, step: int) -> float:
        return self.lr_lambda(step)

    def lr_at(self, step: int, group: int | None = None) -> float:
        step = _steps("step", step)
        base = self.ref_lr if group is None else self.base_lrs[group]
        return base * self.lr_lambda(step)


class WarmUp(StepSchedule):
    """The TensorFlow-side ``WarmUp`` schedule as a PyTorch scheduler (absolute lrs).

    ``lr_at(step) = initial_learning_rate * (step / warmup_steps) ** power`` while
    ``step < warmup_steps``, then ``decay_schedule_fn(step - warmup_steps)``.

    ``decay_schedule_fn`` maps a step to an absolute lr (for example
    ``functools.partial(polynomial_decay_lr, initial_lr=..., decay_steps=..., end_lr=...)``);
    it must be picklable for the scheduler to pickle, and is not part of ``state_dict``.

    Param groups: a group whose base lr equals ``optimizer.defaults["lr"]`` gets exactly
    ``lr_at(step)`` (whatever that default is); other groups get it times
    ``base_lr / defaults["lr"]``, i.e. times their ``lr_scale``.
    """

    name = "warmup"

    def __init__(self, optimizer: Optimizer, initial_learning_rate: float,
                 decay_schedule_fn: Callable[[int], float], warmup_steps: int,
                 power: float = 1.0, last_epoch: int = -1, *, base_lrs: BaseLRs = None,
                 name: str | None = None) -> None:
        if not callable(decay_schedule_fn):
            raise TypeError(f"decay_schedule_fn must be callable, got {decay_schedule_fn!r}")
        self.initial_learning_rate = _real("initial_learning_rate", initial_learning_rate, lo=0.0)
        self.warmup_steps = _steps("warmup_steps", warmup_steps)
        self.power = _real("power", power)
        self.decay_schedule_fn = decay_schedule_fn
        if name is not None:
            self.name = name
        self.config = {"initial_learning_rate": self.initial_learning_rate,
                       "warmup_steps": self.warmup_steps, "power": self.power}
        super().__init__(optimizer, last_epoch=last_epoch, base_lrs=base_lrs)

    def _lr(self, step: int) -> float:
        return F.warmup_then(step, initial_learning_rate=self.initial_learning_rate,
                             warmup_steps=self.warmup_steps, decay_fn=self.decay_schedule_fn,
                             power=self.power)

    def _ratio(self, base: float) -> float:
        if base == self.ref_lr or self.ref_lr == 0.0:
            return 1.0
        return base / self.ref_lr

    def factor_at(self, step: int) -> float:
        lr = self._lr(step)
        return lr / self.ref_lr if self.ref_lr else lr

    def lr_at(self, step: int, group: int | None = None) -> float:
        lr = self._lr(_steps("step", step))
        return lr if group is None else lr * self._ratio(self.base_lrs[group])

    def _lrs(self, step: int) -> list[float]:
        lr = self._lr(step)
        return [lr * self._ratio(b) for b in self.base_lrs]


# --------------------------------------------------------------------------- Adafactor proxy


class AdafactorSchedule(LRScheduler):
    """Report (and write into ``group["lr"]``) the lr a relative-step Adafactor computes.

    Adafactor with ``relative_step=True`` chooses its own step size; this scheduler exists so
    that training loops that log ``get_last_lr()`` or insist on a scheduler keep working.

    Hook: if the optimizer has a method ``relative_step_lrs()`` it must return one float per
    param group (the lr used by the last step, parameter scale included) or ``None`` before
    any step; ``None`` entries, a ``None`` result or a missing hook fall back to
    ``initial_lr``.  Only use it with an optimizer that ignores ``group["lr"]``
    (relative-step Adafactor): otherwise ``initial_lr`` would become the lr.

    :meth:`lr_at` is the pure relative step size
    (:func:`~distopt.schedules.adafactor_relative_step_lr`, without the parameter-scale
    factor, ``initial_lr`` at step 0).

    ``last_epoch`` has torch's meaning (``-1`` fresh, ``N`` lands on step ``N + 1``); the
    groups need no ``initial_lr``.  (transformers' constructor takes no ``last_epoch``.)
    """

    name = "adafactor"

    def __init__(self, optimizer: Optimizer, initial_lr: float = 0.0, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        last_epoch = _last_epoch(last_epoch)
        self.initial_lr = _real("initial_lr", initial_lr, lo=0.0)
        groups = optimizer.param_groups
        self.warmup_init = bool(groups[0].get("warmup_init", False)) if groups else False
        added = [g for g in groups if "initial_lr" not in g]
        for g in added:
            g["initial_lr"] = self.initial_lr
        try:
            super().__init__(optimizer, last_epoch)  # torch: lands on step last_epoch + 1
        finally:
            for g in added:
                del g["initial_lr"]
        self.base_lrs = [self.initial_lr] * len(groups)

    def get_lr(self) -> list[float]:
        hook = getattr(self.optimizer, "relative_step_lrs", None)
        lrs = hook() if callable(hook) else None
        n = len(self.optimizer.param_groups)
        if lrs is not None:
            lrs = list(lrs)
            if len(lrs) != n:
                raise ValueError(
                    f"optimizer.relative_step_lrs() returned {len(lrs)} values for {n} groups"
                )
        out = []
        for i in range(n):
            v = None if lrs is None else lrs[i]
            out.append(self.initial_lr if v is None else float(v))
        return out

    _get_closed_form_lr = get_lr

    def lr_at(self, step: int, group: int | None = None) -> float:
        """Relative step size after ``step`` steps (``initial_lr`` at step 0)."""
        step = _steps("step", step)
        if step == 0:
            return self.initial_lr
        warmup_init = self.warmup_init
        if group is not None:
            warmup_init = bool(self.optimizer.param_groups[group].get("warmup_init", warmup_init))
        return F.adafactor_relative_step_lr(step, warmup_init)


def get_adafactor_schedule(optimizer: Optimizer, initial_lr: float = 0.0,
                           last_epoch: int = -1) -> AdafactorSchedule:
    """:class:`AdafactorSchedule` (defaults: ``initial_lr=0.0``)."""
    return AdafactorSchedule(optimizer, initial_lr=initial_lr, last_epoch=last_epoch)


# --------------------------------------------------------------------------- plateau


class ReduceLROnPlateauSchedule(ReduceLROnPlateau):
    """torch's ``ReduceLROnPlateau``, resumable from ``state_dict`` and with an lr history.

    ``step(metric)`` multiplies each group's lr by ``factor`` once the metric has not
    improved for more than ``patience`` steps (torch semantics and defaults: ``mode="min"``,
    ``factor=0.1``, ``patience=10``, ``threshold=1e-4``, ``threshold_mode="rel"``,
    ``cooldown=0``, ``min_lr=0``, ``eps=1e-8``).

    The lr depends on the metrics seen, so :meth:`lr_at` answers only for steps already
    taken (from the recorded history) and raises ``ValueError`` for future steps.
    ``load_state_dict`` restores the counters, the history and the groups' lrs.

    ``last_epoch`` counts ``step(metric)`` calls, like torch's (``0`` when fresh).  The
    constructor's ``last_epoch`` follows the ``LRScheduler`` convention of the other
    schedules: ``-1`` is fresh (``last_epoch == 0``), ``N >= 0`` gives ``last_epoch == N + 1``;
    the groups' lrs are left as they are.  Only ``load_state_dict`` restores the counters.
    (torch's and transformers' plateau constructors take no ``last_epoch``.)
    """

    name = "reduce_lr_on_plateau"

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float | Sequence[float] = 0, eps: float = 1e-8,
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        last_epoch = _last_epoch(last_epoch)
        _steps("patience", patience)
        _steps("cooldown", cooldown)
        _real("factor", factor, lo=0.0)
        super().__init__(optimizer, mode=mode, factor=factor, patience=patience,
                         threshold=threshold, threshold_mode=threshold_mode,
                         cooldown=cooldown, min_lr=min_lr, eps=eps)
        self.last_epoch = last_epoch + 1  # the LRScheduler convention: -1 -> 0, N -> N + 1
        self.lr_history: list[tuple[int, list[float]]] = [
            (self.last_epoch, [float(x) for x in self._last_lr])
        ]

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        super().step(metrics, epoch)
        lrs = [float(x) for x in self._last_lr]
        if lrs != self.lr_history[-1][1]:
            self.lr_history.append((self.last_epoch, lrs))

    def lr_at(self, step: int, group: int | None = None) -> float:
        """The lr in effect after ``step`` steps (only for steps already taken).

        ``group=None`` returns group 0's lr divided by its ``lr_scale``.
        """
        step = _steps("step", step)
        if step > self.last_epoch:
            raise ValueError(
                f"reduce_lr_on_plateau: the lr at step {step} depends on metrics not seen yet "
                f"(last step {self.last_epoch})"
            )
        lrs = self.lr_history[0][1]
        for epoch, values in self.lr_history:
            if epoch <= step:
                lrs = values
        if group is None:
            return lrs[0] / float(self.optimizer.param_groups[0].get("lr_scale", 1.0))
        return lrs[group]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if len(self._last_lr) != len(self.optimizer.param_groups):
            raise ValueError("saved state has a different number of param groups")
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(float(lr))
            else:
                group["lr"] = float(lr)


def get_reduce_on_plateau_schedule(optimizer: Optimizer, last_epoch: int = -1,
                                   **kwargs: Any) -> ReduceLROnPlateauSchedule:
    """:class:`ReduceLROnPlateauSchedule`; ``kwargs`` are torch's ``ReduceLROnPlateau`` ones."""
    return ReduceLROnPlateauSchedule(optimizer, last_epoch=last_epoch, **kwargs)


# --------------------------------------------------------------------------- factories


def _make(optimizer: Optimizer, fn: Callable[..., float], name: str, last_epoch: int,
          base_lrs: BaseLRs, **config: Any) -> LambdaSchedule:
    lam = functools.partial(fn, **config) if config else fn
    return LambdaSchedule(optimizer, lam, last_epoch=last_epoch, base_lrs=base_lrs, name=name,
                          config=config)


def get_constant_schedule(optimizer: Optimizer, last_epoch: int = -1, *,
                          base_lrs: BaseLRs = None) -> LambdaSchedule:
    """Constant lr: ``lr = base_lr``."""
    _check_optimizer(optimizer)
    return _make(optimizer, F.constant_factor, "constant", last_epoch, base_lrs)


def get_constant_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int,
                                      last_epoch: int = -1, *,
                                      base_lrs: BaseLRs = None) -> LambdaSchedule:
    """``base_lr * step / W`` for ``step < W``, then ``base_lr``."""
    _check_optimizer(optimizer)
    w = _steps("num_warmup_steps", num_warmup_steps)
    return _make(optimizer, F.constant_with_warmup_factor, "constant_with_warmup", last_epoch,
                 base_lrs, num_warmup_steps=w)


def get_linear_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int,
                                    num_training_steps: int, last_epoch: int = -1, *,
                                    base_lrs: BaseLRs = None) -> LambdaSchedule:
    """Linear warmup from 0 over ``W`` steps, then linear decay to 0 at step ``T``.

    Multiplier: ``step / W`` (``step < W``), else ``max(0, (T - step) / max(1, T - W))``.
    """
    _check_optimizer(optimizer)
    w = _steps("num_warmup_steps", num_warmup_steps)
    t = _steps("num_training_steps", num_training_steps)
    _check_total(w, t)
    return _make(optimizer, F.linear_with_warmup_factor, "linear", last_epoch, base_lrs,
                 num_warmup_steps=w, num_training_steps=t)


def get_cosine_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int,
                                    num_training_steps: int, num_cycles: float = 0.5,
                                    last_epoch: int = -1, *,
                                    base_lrs: BaseLRs = None) -> LambdaSchedule:
    """Linear warmup, then cosine: ``max(0, (1 + cos(2 pi num_cycles p)) / 2)``.

    ``p = (step - W) / max(1, T - W)``; the default ``num_cycles=0.5`` decays once to 0.
    """
    _check_optimizer(optimizer)
    w = _steps("num_warmup_steps", num_warmup_steps)
    t = _steps("num_training_steps", num_training_steps)
    _check_total(w, t)
    c = _real("num_cycles", num_cycles, lo=0.0)
    return _make(optimizer, F.cosine_with_warmup_factor, "cosine", last_epoch, base_lrs,
                 num_warmup_steps=w, num_training_steps=t, num_cycles=c)


def get_cosine_with_hard_restarts_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1,
    last_epoch: int = -1, *, base_lrs: BaseLRs = None,
) -> LambdaSchedule:
    """Linear warmup, then ``num_cycles`` half-cosine decays to 0, restarting at base lr.

    Multiplier after warmup: ``0`` when ``p >= 1`` else
    ``max(0, (1 + cos(pi * ((num_cycles * p) mod 1))) / 2)``, ``p = (step - W) / max(1, T - W)``.
    """
    _check_optimizer(optimizer)
    w = _steps("num_warmup_steps", num_warmup_steps)
    t = _steps("num_training_steps", num_training_steps)
    _check_total(w, t)
    _real("num_cycles", num_cycles, lo=0.0, lo_open=True)
    return _make(optimizer, F.cosine_with_hard_restarts_factor, "cosine_with_restarts",
                 last_epoch, base_lrs, num_warmup_steps=w, num_training_steps=t,
                 num_cycles=num_cycles)


def get_polynomial_decay_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, lr_end: float = 1e-7,
    power: float = 1.0, last_epoch: int = -1, *, base_lrs: BaseLRs = None,
) -> LambdaSchedule:
    """Linear warmup, then polynomial decay from ``lr_init`` to ``lr_end`` at step ``T``.

    ``lr_init = optimizer.defaults["lr"]`` (must exceed ``lr_end``; default
    ``lr_end=1e-7``, ``power=1.0``).  For ``W <= step <= T`` the lr of a reference group is
    ``(lr_init - lr_end) * (1 - (step - W) / (T - W)) ** power + lr_end``; ``lr_end`` after.
    Other groups are scaled by ``base_lr / lr_init``.
    """
    _check_optimizer(optimizer)
    w = _steps("num_warmup_steps", num_warmup_steps)
    t = _steps("num_training_steps", num_training_steps)
    _check_total(w, t)
    lr_end = _real("lr_end", lr_end, lo=0.0)
    power = _real("power", power, lo=0.0)
    lr_init = _reference_lr(optimizer)
    if not lr_init > lr_end:
        raise ValueError(f"lr_end ({lr_end}) must be smaller than the initial lr ({lr_init})")
    return _make(optimizer, F.polynomial_decay_with_warmup_factor, "polynomial", last_epoch,
                 base_lrs, num_warmup_steps=w, num_training_steps=t, lr_end=lr_end, power=power,
                 lr_init=lr_init)


def get_inverse_sqrt_schedule(optimizer: Optimizer, num_warmup_steps: int,
                              timescale: int | None = None, last_epoch: int = -1, *,
                              base_lrs: BaseLRs = None) -> LambdaSchedule:
    """Linear warmup, then ``1 / sqrt((step - W + timescale) / timescale)``.

    ``timescale`` defaults to ``num_warmup_steps``, or ``10_000`` when that is 0.
    """
    _check_optimizer(optimizer)
    w = _steps("num_warmup_steps", num_warmup_steps)
    if timescale is None:
        timescale = w or 10_000
    _real("timescale", timescale, lo=0.0, lo_open=True)
    return _make(optimizer, F.inverse_sqrt_factor, "inverse_sqrt", last_epoch, base_lrs,
                 num_warmup_steps=w, timescale=timescale)


def get_cosine_with_min_lr_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int,
    num_cycles: float = 0.5, last_epoch: int = -1, min_lr: float | None = None,
    min_lr_rate: float | None = None, *, base_lrs: BaseLRs = None,
) -> LambdaSchedule:
    """Cosine with warmup whose wave ends at ``min_lr`` instead of 0.

    Give exactly one of ``min_lr`` (absolute, divided by ``optimizer.defaults["lr"]``) or
    ``min_lr_rate`` (fraction of the base lr).  Multiplier after warmup:
    ``c * (1 - min_lr_rate) + min_lr_rate`` with ``c`` the cosine multiplier.
    """
    _check_optimizer(optimizer)
    w = _steps("num_warmup_steps", num_warmup_steps)
    t = _steps("num_training_steps", num_training_steps)
    _check_total(w, t)
    c = _real("num_cycles", num_cycles, lo=0.0)
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("give only one of min_lr or min_lr_rate")
    if min_lr is not None:
        min_lr = _real("min_lr", min_lr, lo=0.0)
        ref = _reference_lr(optimizer)
        if ref <= 0:
            raise ValueError("min_lr needs a positive optimizer.defaults['lr']; use min_lr_rate")
        min_lr_rate = min_lr / ref
    elif min_lr_rate is None:
        raise ValueError("cosine_with_min_lr needs min_lr or min_lr_rate")
    else:
        min_lr_rate = _real("min_lr_rate", min_lr_rate, lo=0.0, hi=1.0)
    return _make(optimizer, F.cosine_with_min_lr_factor, "cosine_with_min_lr", last_epoch,
                 base_lrs, num_warmup_steps=w, num_training_steps=t, num_cycles=c,
                 min_lr_rate=min_lr_rate)


def get_wsd_schedule(
    optimizer: Optimizer, num_warmup_steps: int, num_decay_steps: int,
    num_training_steps: int | None = None, num_stable_steps: int | None = None,
    warmup_type: str = "linear", decay_type: str = "cosine", min_lr_ratio: float = 0,
    num_cycles: float = 0.5, last_epoch: int = -1, *, base_lrs: BaseLRs = None,
) -> LambdaSchedule:
    """Warmup-stable-decay (see :func:`~distopt.schedules.wsd_factor` for the formulas).

    Phases: warmup over ``num_warmup_steps`` (``warmup_type`` linear / cosine / 1-sqrt, from
    ``min_lr_ratio``), stable at the base lr for ``num_stable_steps`` (default
    ``num_training_steps - W - D``), decay over ``num_decay_steps`` (``decay_type``, default
    cosine) down to ``min_lr_ratio`` (default 0), which then holds.  Give
    ``num_training_steps`` or ``num_stable_steps``; if both, ``num_stable_steps`` is used.
    """
    _check_optimizer(optimizer)
    w = _steps("num_warmup_steps", num_warmup_steps)
    d = _steps("num_decay_steps", num_decay_steps)
    if num_training_steps is None and num_stable_steps is None:
        raise ValueError("warmup_stable_decay needs num_training_steps or num_stable_steps")
    if warmup_type not in F.WARMUP_TYPES:
        raise ValueError(f"warmup_type must be one of {F.WARMUP_TYPES}, got {warmup_type!r}")
    if decay_type not in F.DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {F.DECAY_TYPES}, got {decay_type!r}")
    min_lr_ratio = _real("min_lr_ratio", min_lr_ratio, lo=0.0, hi=1.0)
    c = _real("num_cycles", num_cycles, lo=0.0)
    if num_stable_steps is not None:
        s = _steps("num_stable_steps", num_stable_steps)
        if num_training_steps is not None:
            t = _steps("num_training_steps", num_training_steps)
            if w + s + d != t:
                warnings.warn(
                    f"warmup_stable_decay: num_warmup_steps + num_stable_steps + num_decay_steps "
                    f"= {w + s + d} != num_training_steps = {t}; using num_stable_steps={s}",
                    stacklevel=2,
                )
    else:
        t = _steps("num_training_steps", num_training_steps)
        s = t - w - d
        if s < 0:
            raise ValueError(
                f"num_warmup_steps + num_decay_steps ({w + d}) exceeds num_training_steps ({t})"
            )
    return _make(optimizer, F.wsd_factor, "warmup_stable_decay", last_epoch, base_lrs,
                 num_warmup_steps=w, num_stable_steps=s, num_decay_steps=d,
                 warmup_type=warmup_type, decay_type=decay_type, min_lr_ratio=min_lr_ratio,
                 num_cycles=c)


def create_tf_style_schedule(optimizer: Optimizer, init_lr: float, num_train_steps: int,
                             num_warmup_steps: int, min_lr_ratio: float = 0.0,
                             power: float = 1.0, last_epoch: int = -1, *,
                             base_lrs: BaseLRs = None) -> WarmUp:
    """The schedule of TensorFlow ``create_optimizer``, as a :class:`WarmUp` scheduler.

    Linear warmup to ``init_lr`` over ``num_warmup_steps``, then
    :func:`~distopt.schedules.polynomial_decay_lr` to ``init_lr * min_lr_ratio`` over the
    remaining steps with ``power``.
    """
    init_lr = _real("init_lr", init_lr, lo=0.0)
    t = _steps("num_train_steps", num_train_steps)
    w = _steps("num_warmup_steps", num_warmup_steps)
    _check_total(w, t)
    min_lr_ratio = _real("min_lr_ratio", min_lr_ratio, lo=0.0, hi=1.0)
    decay = functools.partial(F.polynomial_decay_lr, initial_lr=init_lr, decay_steps=t - w,
                              end_lr=init_lr * min_lr_ratio, power=_real("power", power))
    return WarmUp(optimizer, init_lr, decay, w, power=1.0, last_epoch=last_epoch,
                  base_lrs=base_lrs)


# --------------------------------------------------------------------------- by name


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


_T = SchedulerType
TYPE_TO_SCHEDULER_FUNCTION: dict[SchedulerType, Callable[..., LRScheduler]] = {
    _T.LINEAR: get_linear_schedule_with_warmup,
    _T.COSINE: get_cosine_schedule_with_warmup,
    _T.COSINE_WITH_RESTARTS: get_cosine_with_hard_restarts_schedule_with_warmup,
    _T.POLYNOMIAL: get_polynomial_decay_schedule_with_warmup,
    _T.CONSTANT: get_constant_schedule,
    _T.CONSTANT_WITH_WARMUP: get_constant_schedule_with_warmup,
    _T.INVERSE_SQRT: get_inverse_sqrt_schedule,
    _T.REDUCE_ON_PLATEAU: get_reduce_on_plateau_schedule,
    _T.COSINE_WITH_MIN_LR: get_cosine_with_min_lr_schedule_with_warmup,
    _T.WARMUP_STABLE_DECAY: get_wsd_schedule,
}

# Which of the step counts get_scheduler must be given, per schedule.
_NEEDS_WARMUP = {_T.LINEAR, _T.COSINE, _T.COSINE_WITH_RESTARTS, _T.POLYNOMIAL,
                 _T.CONSTANT_WITH_WARMUP, _T.INVERSE_SQRT, _T.COSINE_WITH_MIN_LR,
                 _T.WARMUP_STABLE_DECAY}
_NEEDS_TOTAL = {_T.LINEAR, _T.COSINE, _T.COSINE_WITH_RESTARTS, _T.POLYNOMIAL,
                _T.COSINE_WITH_MIN_LR}
_FILLED = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch", "base_lrs"}
_PLATEAU_KWARGS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown",
                   "min_lr", "eps")

#: Names that :func:`list_schedules` shows besides the :class:`SchedulerType` ones.
EXTRA_SCHEDULES = ("adafactor", "warmup")


def scheduler_kwargs(name: str | SchedulerType) -> dict[str, Any]:
    """The ``scheduler_specific_kwargs`` schedule ``name`` accepts, with their defaults
    (``inspect.Parameter.empty`` for required ones)."""
    stype = SchedulerType(getattr(name, "value", name))
    if stype is _T.REDUCE_ON_PLATEAU:
        sig = inspect.signature(ReduceLROnPlateauSchedule.__init__)
        return {k: sig.parameters[k].default for k in _PLATEAU_KWARGS}
    sig = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[stype])
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
    base_lrs: BaseLRs = None,
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
    _check_optimizer(optimizer)
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
    if stype in _NEEDS_WARMUP and num_warmup_steps is None:
        missing.append("num_warmup_steps")
    if stype in _NEEDS_TOTAL and num_training_steps is None:
        missing.append("num_training_steps")
    if stype is _T.WARMUP_STABLE_DECAY:
        if num_training_steps is None and kwargs.get("num_stable_steps") is None:
            missing.append("num_training_steps (or scheduler_specific_kwargs['num_stable_steps'])")
        if "num_decay_steps" not in kwargs:
            missing.append("scheduler_specific_kwargs['num_decay_steps']")
    if missing:
        raise ValueError(f"{stype.value!r} requires {' and '.join(missing)}")
    factory = TYPE_TO_SCHEDULER_FUNCTION[stype]
    if stype is _T.REDUCE_ON_PLATEAU:
        if base_lrs is not None:
            raise TypeError("reduce_lr_on_plateau does not take base_lrs")
        return factory(optimizer, last_epoch=last_epoch, **kwargs)
    call: dict[str, Any] = {"last_epoch": last_epoch, "base_lrs": base_lrs, **kwargs}
    if stype in _NEEDS_WARMUP:
        call["num_warmup_steps"] = num_warmup_steps
    if stype in _NEEDS_TOTAL or (stype is _T.WARMUP_STABLE_DECAY and num_training_steps is not None):
        call["num_training_steps"] = num_training_steps
    return factory(optimizer, **call)


def list_schedules() -> list[str]:
    """Sorted names: those :func:`get_scheduler` accepts plus ``adafactor`` and ``warmup``."""
    return sorted([t.value for t in SchedulerType] + list(EXTRA_SCHEDULES))
