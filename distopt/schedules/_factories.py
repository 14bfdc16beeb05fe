"""The transformers-named schedule factories (``get_*_schedule*``) and the TF-style schedule.

Each factory checks its arguments and returns a :class:`~distopt.schedules.LambdaSchedule`
over a pure function of :mod:`distopt.schedules._functions` (or a :class:`WarmUp`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from distopt.schedules import _checks as C
from distopt.schedules import _functions as F
from distopt.schedules._base import LambdaSchedule, WarmUp

# --------------------------------------------------------------------------- factories


def _make(optimizer: Optimizer, fn: Callable[..., float], name: str, last_epoch: int,
          base_lrs: C.BaseLRs, **config: Any) -> LambdaSchedule:
    lam = functools.partial(fn, **config) if config else fn
    return LambdaSchedule(optimizer, lam, last_epoch=last_epoch, base_lrs=base_lrs, name=name,
                          config=config)


def get_constant_schedule(optimizer: Optimizer, last_epoch: int = -1, *,
                          base_lrs: C.BaseLRs = None) -> LambdaSchedule:
    """Constant lr: ``lr = base_lr``."""
    C.check_optimizer(optimizer)
    return _make(optimizer, F.constant_factor, "constant", last_epoch, base_lrs)


def get_constant_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int,
                                      last_epoch: int = -1, *,
                                      base_lrs: C.BaseLRs = None) -> LambdaSchedule:
    """``base_lr * step / W`` for ``step < W``, then ``base_lr``."""
    C.check_optimizer(optimizer)
    w = C.steps("num_warmup_steps", num_warmup_steps)
    return _make(optimizer, F.constant_with_warmup_factor, "constant_with_warmup", last_epoch,
                 base_lrs, num_warmup_steps=w)


def get_linear_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int,
                                    num_training_steps: int, last_epoch: int = -1, *,
                                    base_lrs: C.BaseLRs = None) -> LambdaSchedule:
    """Linear warmup from 0 over ``W`` steps, then linear decay to 0 at step ``T``.

    Multiplier: ``step / W`` (``step < W``), else ``max(0, (T - step) / max(1, T - W))``.
    """
    C.check_optimizer(optimizer)
    w = C.steps("num_warmup_steps", num_warmup_steps)
    t = C.steps("num_training_steps", num_training_steps)
    C.check_total(w, t)
    return _make(optimizer, F.linear_with_warmup_factor, "linear", last_epoch, base_lrs,
                 num_warmup_steps=w, num_training_steps=t)


def get_cosine_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int,
                                    num_training_steps: int, num_cycles: float = 0.5,
                                    last_epoch: int = -1, *,
                                    base_lrs: C.BaseLRs = None) -> LambdaSchedule:
    """Linear warmup, then cosine: ``max(0, (1 + cos(2 pi num_cycles p)) / 2)``.

    ``p = (step - W) / max(1, T - W)``; the default ``num_cycles=0.5`` decays once to 0.
    """
    C.check_optimizer(optimizer)
    w = C.steps("num_warmup_steps", num_warmup_steps)
    t = C.steps("num_training_steps", num_training_steps)
    C.check_total(w, t)
    c = C.real("num_cycles", num_cycles, lo=0.0)
    return _make(optimizer, F.cosine_with_warmup_factor, "cosine", last_epoch, base_lrs,
                 num_warmup_steps=w, num_training_steps=t, num_cycles=c)


def get_cosine_with_hard_restarts_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1,
    last_epoch: int = -1, *, base_lrs: C.BaseLRs = None,
) -> LambdaSchedule:
    """Linear warmup, then ``num_cycles`` half-cosine decays to 0, restarting at base lr.

    Multiplier after warmup: ``0`` when ``p >= 1`` else
    ``max(0, (1 + cos(pi * ((num_cycles * p) mod 1))) / 2)``, ``p = (step - W) / max(1, T - W)``.
    """
    C.check_optimizer(optimizer)
    w = C.steps("num_warmup_steps", num_warmup_steps)
    t = C.steps("num_training_steps", num_training_steps)
    C.check_total(w, t)
    C.real("num_cycles", num_cycles, lo=0.0, lo_open=True)
    return _make(optimizer, F.cosine_with_hard_restarts_factor, "cosine_with_restarts",
                 last_epoch, base_lrs, num_warmup_steps=w, num_training_steps=t,
                 num_cycles=num_cycles)


def get_polynomial_decay_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, lr_end: float = 1e-7,
    power: float = 1.0, last_epoch: int = -1, *, base_lrs: C.BaseLRs = None,
) -> LambdaSchedule:
    """Linear warmup, then polynomial decay from ``lr_init`` to ``lr_end`` at step ``T``.

    ``lr_init = optimizer.defaults["lr"]`` (must exceed ``lr_end``; default
    ``lr_end=1e-7``, ``power=1.0``).  For ``W <= step <= T`` the lr of a reference group is
    ``(lr_init - lr_end) * (1 - (step - W) / (T - W)) ** power + lr_end``; ``lr_end`` after.
    Other groups are scaled by ``base_lr / lr_init``.
    """
    C.check_optimizer(optimizer)
    w = C.steps("num_warmup_steps", num_warmup_steps)
    t = C.steps("num_training_steps", num_training_steps)
    C.check_total(w, t)
    lr_end = C.real("lr_end", lr_end, lo=0.0)
    power = C.real("power", power, lo=0.0)
    lr_init = C.reference_lr(optimizer)
    if not lr_init > lr_end:
        raise ValueError(f"lr_end ({lr_end}) must be smaller than the initial lr ({lr_init})")
    return _make(optimizer, F.polynomial_decay_with_warmup_factor, "polynomial", last_epoch,
                 base_lrs, num_warmup_steps=w, num_training_steps=t, lr_end=lr_end, power=power,
                 lr_init=lr_init)


def get_inverse_sqrt_schedule(optimizer: Optimizer, num_warmup_steps: int,
                              timescale: int | None = None, last_epoch: int = -1, *,
                              base_lrs: C.BaseLRs = None) -> LambdaSchedule:
    """Linear warmup, then ``1 / sqrt((step - W + timescale) / timescale)``.

    ``timescale`` defaults to ``num_warmup_steps``, or ``10_000`` when that is 0.
    """
    C.check_optimizer(optimizer)
    w = C.steps("num_warmup_steps", num_warmup_steps)
    if timescale is None:
        timescale = w or 10_000
    C.real("timescale", timescale, lo=0.0, lo_open=True)
    return _make(optimizer, F.inverse_sqrt_factor, "inverse_sqrt", last_epoch, base_lrs,
                 num_warmup_steps=w, timescale=timescale)


def get_cosine_with_min_lr_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int,
    num_cycles: float = 0.5, last_epoch: int = -1, min_lr: float | None = None,
    min_lr_rate: float | None = None, *, base_lrs: C.BaseLRs = None,
) -> LambdaSchedule:
    """Cosine with warmup whose wave ends at ``min_lr`` instead of 0.

    Give exactly one of ``min_lr`` (absolute, divided by ``optimizer.defaults["lr"]``) or
    ``min_lr_rate`` (fraction of the base lr).  Multiplier after warmup:
    ``c * (1 - min_lr_rate) + min_lr_rate`` with ``c`` the cosine multiplier.
    """
    C.check_optimizer(optimizer)
    w = C.steps("num_warmup_steps", num_warmup_steps)
    t = C.steps("num_training_steps", num_training_steps)
    C.check_total(w, t)
    c = C.real("num_cycles", num_cycles, lo=0.0)
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("give only one of min_lr or min_lr_rate")
    if min_lr is not None:
        min_lr = C.real("min_lr", min_lr, lo=0.0)
        ref = C.reference_lr(optimizer)
        if ref <= 0:
            raise ValueError("min_lr needs a positive optimizer.defaults['lr']; use min_lr_rate")
        min_lr_rate = min_lr / ref
    elif min_lr_rate is None:
        raise ValueError("cosine_with_min_lr needs min_lr or min_lr_rate")
    else:
        min_lr_rate = C.real("min_lr_rate", min_lr_rate, lo=0.0, hi=1.0)
    return _make(optimizer, F.cosine_with_min_lr_factor, "cosine_with_min_lr", last_epoch,
                 base_lrs, num_warmup_steps=w, num_training_steps=t, num_cycles=c,
                 min_lr_rate=min_lr_rate)


def get_wsd_schedule(
    optimizer: Optimizer, num_warmup_steps: int, num_decay_steps: int,
    num_training_steps: int | None = None, num_stable_steps: int | None = None,
    warmup_type: str = "linear", decay_type: str = "cosine", min_lr_ratio: float = 0,
    num_cycles: float = 0.5, last_epoch: int = -1, *, base_lrs: C.BaseLRs = None,
) -> LambdaSchedule:
    """Warmup-stable-decay (see :func:`~distopt.schedules.wsd_factor` for the formulas).

    Phases: warmup over ``num_warmup_steps`` (``warmup_type`` linear / cosine / 1-sqrt, from
    ``min_lr_ratio``), stable at the base lr for ``num_stable_steps`` (default
    ``num_training_steps - W - D``), decay over ``num_decay_steps`` (``decay_type``, default
    cosine) down to ``min_lr_ratio`` (default 0), which then holds.  Give
    ``num_training_steps`` or ``num_stable_steps``; if both, ``num_stable_steps`` is used.
    """
    C.check_optimizer(optimizer)
    w = C.steps("num_warmup_steps", num_warmup_steps)
    d = C.steps("num_decay_steps", num_decay_steps)
    if num_training_steps is None and num_stable_steps is None:
        raise ValueError("warmup_stable_decay needs num_training_steps or num_stable_steps")
    if warmup_type not in F.WARMUP_TYPES:
        raise ValueError(f"warmup_type must be one of {F.WARMUP_TYPES}, got {warmup_type!r}")
    if decay_type not in F.DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {F.DECAY_TYPES}, got {decay_type!r}")
    min_lr_ratio = C.real("min_lr_ratio", min_lr_ratio, lo=0.0, hi=1.0)
    c = C.real("num_cycles", num_cycles, lo=0.0)
    if num_stable_steps is not None:
        s = C.steps("num_stable_steps", num_stable_steps)
        if num_training_steps is not None:
            t = C.steps("num_training_steps", num_training_steps)
            if w + s + d != t:
                warnings.warn(
                    f"warmup_stable_decay: num_warmup_steps + num_stable_steps + num_decay_steps "
                    f"= {w + s + d} != num_training_steps = {t}; using num_stable_steps={s}",
                    stacklevel=2,
                )
    else:
        t = C.steps("num_training_steps", num_training_steps)
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
                             base_lrs: C.BaseLRs = None) -> WarmUp:
    """The schedule of TensorFlow ``create_optimizer``, as a :class:`WarmUp` scheduler.

    Linear warmup to ``init_lr`` over ``num_warmup_steps``, then
    :func:`~distopt.schedules.polynomial_decay_lr` to ``init_lr * min_lr_ratio`` over the
    remaining steps with ``power``.
    """
    init_lr = C.real("init_lr", init_lr, lo=0.0)
    t = C.steps("num_train_steps", num_train_steps)
    w = C.steps("num_warmup_steps", num_warmup_steps)
    C.check_total(w, t)
    min_lr_ratio = C.real("min_lr_ratio", min_lr_ratio, lo=0.0, hi=1.0)
    decay = functools.partial(F.polynomial_decay_lr, initial_lr=init_lr, decay_steps=t - w,
                              end_lr=init_lr * min_lr_ratio, power=C.real("power", power))
    return WarmUp(optimizer, init_lr, decay, w, power=1.0, last_epoch=last_epoch,
                  base_lrs=base_lrs)

