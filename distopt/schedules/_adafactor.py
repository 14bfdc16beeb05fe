"""The Adafactor schedule proxy: reports the lr a relative-step Adafactor computes itself."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from distopt.schedules import _checks as C
from distopt.schedules import _functions as F

__all__ = ["AdafactorSchedule", "get_adafactor_schedule"]

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
        C.check_optimizer(optimizer)
        last_epoch = C.last_epoch(last_epoch)
        self.initial_lr = C.real("initial_lr", initial_lr, lo=0.0)
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
        step = C.steps("step", step)
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

