"""Pure learning-rate functions of the optimizer step.

Everything here is a module-level function of plain numbers, so that a schedule built
from ``functools.partial(fn, **hyperparameters)`` pickles, can be evaluated without an
optimizer, and can be reused by other parts of distopt (the TensorFlow-style
``create_optimizer`` reuses :func:`polynomial_decay_lr` and :func:`warmup_then`).
:func:`adafactor_relative_step_lr` is the Adafactor optimizer's own step size, defined in the
layer below (:func:`distopt.optim.adafactor.relative_step_lr`) and re-exported here.

Two kinds of function live here:

* ``*_factor(step, ...)`` return a **multiplier** of the base learning rate (the
  ``LambdaLR`` convention). The scheduled lr of a param group is
  ``base_lr * factor(step)``.
* ``*_lr(step, ...)`` return an **absolute** learning rate (the TensorFlow convention).

``step`` is the number of optimizer steps taken so far (0 before the first step). Steps
are always optimizer steps: never micro-batches, never multiplied by the world size.

The arithmetic follows the reference formulas of ``transformers.optimization`` operation
for operation so that the numbers agree to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from distopt.optim.adafactor import relative_step_lr as adafactor_relative_step_lr

__all__ = [
    "WARMUP_TYPES",
    "DECAY_TYPES",
    "constant_factor",
    "constant_with_warmup_factor",
    "linear_with_warmup_factor",
    "cosine_with_warmup_factor",
    "cosine_with_hard_restarts_factor",
    "polynomial_decay_with_warmup_factor",
    "inverse_sqrt_factor",
    "cosine_with_min_lr_factor",
    "wsd_factor",
    "adafactor_relative_step_lr",
    "polynomial_decay_lr",
    "warmup_then",
    "tf_style_lr",
]

#: Shapes accepted by :func:`wsd_factor` for its warmup and its decay phase.
WARMUP_TYPES = ("linear", "cosine", "1-sqrt")
DECAY_TYPES = ("linear", "cosine", "1-sqrt")


def _warmup(step: int, num_warmup_steps: int) -> float:
    # Linear ramp 0 -> 1 over ``num_warmup_steps`` steps (the step reaching 1 is the first
    # step after warmup).
    return float(step) / float(max(1, num_warmup_steps))


def constant_factor(step: int = 0) -> float:
    """Multiplier ``1.0`` at every step."""
    return 1.0


def constant_with_warmup_factor(step: int, *, num_warmup_steps: int) -> float:
    """``step / W`` while ``step < W``, then ``1.0``.  (``W = num_warmup_steps``)"""
    if step < num_warmup_steps:
        return float(step) / float(max(1.0, num_warmup_steps))
    return 1.0


def linear_with_warmup_factor(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    """Linear warmup to 1, then a straight line down to 0 at ``num_training_steps``.

    ``step / W`` for ``step < W``; afterwards ``max(0, (T - step) / max(1, T - W))``.
    """
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return max(
        0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps))
    )


def cosine_with_warmup_factor(
    step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5
) -> float:
    """Linear warmup, then a cosine wave.

    With ``p = (step - W) / max(1, T - W)``: ``max(0, (1 + cos(2 pi num_cycles p)) / 2)``.
    The default ``num_cycles=0.5`` is one half wave: from 1 down to 0 at step ``T``.
    """
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def cosine_with_hard_restarts_factor(
    step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 1
) -> float:
    """Linear warmup, then ``num_cycles`` half-cosine decays from 1 to 0, each restarting at 1.

    With ``p = (step - W) / max(1, T - W)``: ``0`` once ``p >= 1``, else
    ``max(0, (1 + cos(pi * ((num_cycles * p) mod 1))) / 2)``.
    """
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def polynomial_decay_with_warmup_factor(
    step: int,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    lr_init: float,
    lr_end: float = 1e-7,
    power: float = 1.0,
) -> float:
    """Linear warmup, then a polynomial decay from ``lr_init`` to ``lr_end``, as a multiplier.

    For ``W <= step <= T``: ``((lr_init - lr_end) * (1 - (step - W) / (T - W)) ** power
    + lr_end) / lr_init``; after ``T``: ``lr_end / lr_init``.
    """
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    decay_steps = num_training_steps - num_warmup_steps
    if step > num_training_steps or decay_steps <= 0:
        return lr_end / lr_init
    lr_range = lr_init - lr_end
    pct_remaining = 1 - (step - num_warmup_steps) / decay_steps
    decay = lr_range * pct_remaining**power + lr_end
    return decay / lr_init


def inverse_sqrt_factor(step: int, *, num_warmup_steps: int, timescale: float) -> float:
    """Linear warmup, then ``1 / sqrt((step - W + timescale) / timescale)``.

    The decay equals 1 at ``step == W`` and halves every time ``step - W + timescale``
    quadruples.
    """
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    shift = timescale - num_warmup_steps
    return 1.0 / math.sqrt((step + shift) / timescale)


def cosine_with_min_lr_factor(
    step: int,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    min_lr_rate: float = 0.0,
) -> float:
    """Like :func:`cosine_with_warmup_factor`, but the wave spans ``[min_lr_rate, 1]``.

    With ``c`` the plain cosine factor: ``max(0, c * (1 - min_lr_rate) + min_lr_rate)``.
    """
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def wsd_factor(
    step: int,
    *,
    num_warmup_steps: int,
    num_stable_steps: int,
    num_decay_steps: int,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> float:
    """Warmup-stable-decay: rise, hold at 1, fall, then hold at ``min_lr_ratio``.

    * warmup (``step < W``), with ``p = step / max(1, W)``: ``linear`` p,
      ``cosine`` ``(1 - cos(pi p)) / 2``, ``1-sqrt`` ``1 - sqrt(1 - p)``; rescaled to
      ``[min_lr_ratio, 1]``.
    * stable (``W <= step < W + S``): ``1``.
    * decay (``W + S <= step < W + S + D``), with ``p = (step - W - S) / max(1, D)``:
      ``linear`` ``1 - p``, ``cosine`` ``(1 + cos(2 pi num_cycles p)) / 2``,
      ``1-sqrt`` ``1 - sqrt(p)``; rescaled to ``[min_lr_ratio, 1]``.
    * afterwards: ``min_lr_ratio``.
    """
    if step < num_warmup_steps:
        progress = float(step) / float(max(1, num_warmup_steps))
        if warmup_type == "linear":
            factor = progress
        elif warmup_type == "cosine":
            factor = 0.5 * (1.0 - math.cos(math.pi * progress))
        elif warmup_type == "1-sqrt":
            factor = 1.0 - math.sqrt(1.0 - progress)
        else:
            raise ValueError(f"warmup_type must be one of {WARMUP_TYPES}, got {warmup_type!r}")
        factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio
        return max(0.0, factor)
    if step < num_warmup_steps + num_stable_steps:
        return 1.0
    if step < num_warmup_steps + num_stable_steps + num_decay_steps:
        progress = float(step - num_warmup_steps - num_stable_steps) / float(max(1, num_decay_steps))
        if decay_type == "linear":
            factor = 1.0 - progress
        elif decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
        elif decay_type == "1-sqrt":
            factor = 1.0 - math.sqrt(progress)
        else:
            raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")
        factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio
        return max(0.0, factor)
    return min_lr_ratio


def polynomial_decay_lr(
    step: int, initial_lr: float, decay_steps: int, end_lr: float = 1e-4, power: float = 1.0
) -> float:
    """Absolute lr of Keras' ``PolynomialDecay`` (``cycle=False``).

    ``(initial_lr - end_lr) * (1 - min(step, decay_steps) / decay_steps) ** power + end_lr``;
    ``end_lr`` for every step when ``decay_steps == 0``.
    """
    if decay_steps < 0:
        raise ValueError(f"decay_steps must be >= 0, got {decay_steps}")
    if decay_steps == 0:
        return float(end_lr)
    step = min(step, decay_steps)
    return (initial_lr - end_lr) * (1.0 - step / decay_steps) ** power + end_lr


def warmup_then(
    step: int,
    *,
    initial_learning_rate: float,
    warmup_steps: int,
    decay_fn: Callable[[int], float],
    power: float = 1.0,
) -> float:
    """Absolute lr of the TensorFlow-side ``WarmUp`` schedule.

    ``initial_learning_rate * (step / warmup_steps) ** power`` while ``step < warmup_steps``,
    then ``decay_fn(step - warmup_steps)``.
    """
    if step < warmup_steps:
        return initial_learning_rate * (float(step) / float(warmup_steps)) ** power
    return float(decay_fn(step - warmup_steps))


def tf_style_lr(
    step: int,
    *,
    init_lr: float,
    num_train_steps: int,
    num_warmup_steps: int,
    min_lr_ratio: float = 0.0,
    power: float = 1.0,
) -> float:
    """The lr of the TensorFlow ``create_optimizer`` recipe.

    Linear warmup (power 1) from 0 to ``init_lr`` over ``num_warmup_steps``, then
    :func:`polynomial_decay_lr` from ``init_lr`` to ``init_lr * min_lr_ratio`` over the
    remaining ``num_train_steps - num_warmup_steps`` steps with the given ``power``.
    """
    decay_steps = num_train_steps - num_warmup_steps
    end_lr = init_lr * min_lr_ratio
    if step < num_warmup_steps:
        return init_lr * (float(step) / float(num_warmup_steps))
    return polynomial_decay_lr(step - num_warmup_steps, init_lr, decay_steps, end_lr, power)
