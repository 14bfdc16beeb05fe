"""Stepping distopt schedules under Hugging Face Accelerate, without importing it.

distopt counts schedule steps in **optimizer steps**.  A scheduler passed through
``accelerator.prepare`` is, by default (``step_scheduler_with_optimizer=True`` and
``split_batches=False``), stepped ``num_processes`` times per optimizer step, which would
run the schedule ``world_size`` times too fast.  Build the Accelerator with
:func:`accelerator_kwargs` and step the scheduler with :func:`step_scheduler` after each
optimizer step; see docs/schedules.md for the full recipe.

Both are re-exported as ``distopt.schedules.accelerator_kwargs`` / ``step_scheduler``, lazily,
so that the schedules layer never imports this one at import time.  Neither imports Accelerate.
"""

from __future__ import annotations

from typing import Any

__all__ = ["accelerator_kwargs", "step_scheduler"]


def accelerator_kwargs(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``accelerate.Accelerator`` that keep schedules in optimizer steps.

    Returns ``{"step_scheduler_with_optimizer": False, **overrides}``: a prepared scheduler
    then steps exactly once per ``scheduler.step()`` call, whatever the world size.
    ``split_batches`` is left to you (it changes how batches are split, not the schedule).
    """
    return {"step_scheduler_with_optimizer": False, **overrides}


def step_scheduler(scheduler: Any, accelerator: Any = None) -> bool:
    """Step ``scheduler`` once if the optimizer really stepped; return whether it did.

    With an ``accelerator`` (duck-typed), nothing happens on gradient-accumulation
    micro-steps (``accelerator.sync_gradients`` false) or when the optimizer step was
    skipped (``accelerator.optimizer_step_was_skipped``, e.g. an fp16 overflow).
    """
    if accelerator is not None:
        if not getattr(accelerator, "sync_gradients", True):
            return False
        if getattr(accelerator, "optimizer_step_was_skipped", False):
            return False
    scheduler.step()
    return True
