"""Argument checks and base-lr lookups shared by the schedule modules."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

#: what a ``base_lrs`` argument may be (see :mod:`distopt.schedules._base`)
BaseLRs = float | Sequence[float] | None

# --------------------------------------------------------------------------- validation


def steps(name: str, value: Any) -> int:
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


def real(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
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


def check_total(num_warmup_steps: int, num_training_steps: int) -> None:
    if num_training_steps < num_warmup_steps:
        raise ValueError(
            f"num_training_steps ({num_training_steps}) must be >= num_warmup_steps "
            f"({num_warmup_steps})"
        )


def last_epoch(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"last_epoch must be an integer >= -1, got {value!r}")
    if value < -1:
        raise ValueError(f"last_epoch must be >= -1, got {value}")
    return int(value)


def check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")


def as_float(x: Any) -> float | None:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x)
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    return None


def reference_lr(optimizer: Optimizer) -> float:
    """The lr a group with ``lr_scale == 1`` is scheduled from: ``optimizer.defaults["lr"]``.

    Falls back to the first group's ``initial_lr`` (or ``lr``) when the optimizer has no
    numeric default lr (e.g. a relative-step Adafactor).
    """
    lr = as_float(optimizer.defaults.get("lr"))
    if lr is not None:
        return lr
    for group in optimizer.param_groups:
        for key in ("initial_lr", "lr"):
            lr = as_float(group.get(key))
            if lr is not None:
                return lr / float(group.get("lr_scale", 1.0))
    return 1.0

