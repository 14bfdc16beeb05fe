"""The schedule base classes: :class:`StepSchedule`, :class:`LambdaSchedule`, :class:`WarmUp`.

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

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from distopt.schedules import _checks as C
from distopt.schedules import _functions as F

__all__ = ["StepSchedule", "LambdaSchedule", "WarmUp"]

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
                 base_lrs: C.BaseLRs = None) -> None:
        C.check_optimizer(optimizer)
        last_epoch = C.last_epoch(last_epoch)
        if not hasattr(self, "config"):
            self.config: dict[str, Any] = {}
        self.ref_lr = C.reference_lr(optimizer)
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
        step = C.steps("step", step)
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
                          base_lrs: C.BaseLRs) -> list[float]:
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
            initial = C.as_float(group.get("initial_lr"))
            if initial is not None:
                out.append(initial)
                continue
            current = C.as_float(group.get("lr"))
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
        self.last_epoch = C.last_epoch(int(state_dict["last_epoch"]))
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
                 last_epoch: int = -1, base_lrs: C.BaseLRs = None, name: str = "lambda",
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
        step = C.steps("step", step)
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
                 power: float = 1.0, last_epoch: int = -1, *, base_lrs: C.BaseLRs = None,
                 name: str | None = None) -> None:
        if not callable(decay_schedule_fn):
            raise TypeError(f"decay_schedule_fn must be callable, got {decay_schedule_fn!r}")
        self.initial_learning_rate = C.real("initial_learning_rate", initial_learning_rate, lo=0.0)
        self.warmup_steps = C.steps("warmup_steps", warmup_steps)
        self.power = C.real("power", power)
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
        lr = self._lr(C.steps("step", step))
        return lr if group is None else lr * self._ratio(self.base_lrs[group])

    def _lrs(self, step: int) -> list[float]:
        lr = self._lr(step)
        return [lr * self._ratio(b) for b in self.base_lrs]

