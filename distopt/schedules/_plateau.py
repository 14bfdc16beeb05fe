"""torch's ``ReduceLROnPlateau``, resumable and with an lr history."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distopt.schedules import _checks as C

__all__ = ["ReduceLROnPlateauSchedule", "get_reduce_on_plateau_schedule"]

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
        C.check_optimizer(optimizer)
        last_epoch = C.last_epoch(last_epoch)
        C.steps("patience", patience)
        C.steps("cooldown", cooldown)
        C.real("factor", factor, lo=0.0)
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
        step = C.steps("step", step)
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

