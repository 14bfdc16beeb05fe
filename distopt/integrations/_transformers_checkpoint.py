"""Checkpoints of :class:`DistoptTrainer`: distopt's state inside the Trainer's ``checkpoint-N``.

With ZeRO, the optimizer, schedule and accumulator go through :func:`distopt.checkpoint.save`
into ``checkpoint-N/distopt``; :func:`load` reads that folder back (at any world size), or imports
a plain Trainer's ``optimizer.pt`` + ``scheduler.pt`` into a distopt-sharded optimizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SUBDIR", "load", "save"]

log = logging.getLogger("distopt.integrations.transformers")

#: sub-folder of a Trainer checkpoint that holds distopt's sharded state
SUBDIR = "distopt"


def save(
    folder: Path,
    *,
    sharded: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accumulator: Any,
    step: int,
) -> None:
    """Write the sharded model's optimizer, ``scheduler`` and ``accumulator`` into ``folder``."""
    import distopt.checkpoint as ckpt

    ckpt.save(
        folder,
        model=sharded,
        optimizer=optimizer,
        scheduler=scheduler,
        accumulator=accumulator,
        extra={"step": int(step), "written_by": "DistoptTrainer"},
    )


def load(
    checkpoint: Path,
    *,
    sharded: nn.Module | None,
    model_wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accumulator: Any,
) -> None:
    """Restore the optimizer state of a Trainer ``checkpoint`` (distopt's folder, else ``optimizer.pt``).

    ``sharded`` is the ZeRO :class:`~distopt.zero.ShardedModule`, or None without ZeRO (then
    ``model_wrapped`` is the model the checkpoint is read into, and the accumulator is not
    restored).
    """
    import distopt.checkpoint as ckpt

    folder = checkpoint / SUBDIR
    if folder.exists():
        is_sharded = sharded is not None
        ckpt.load(
            folder,
            model=sharded if is_sharded else model_wrapped,
            optimizer=optimizer,
            scheduler=scheduler,
            accumulator=accumulator if is_sharded else None,
            restore_rng=False,  # the Trainer restores its RNG
        )
        log.info("restored distopt optimizer, schedule and accumulator from %s", folder)
        return
    opt_file, sched_file = checkpoint / "optimizer.pt", checkpoint / "scheduler.pt"
    if opt_file.is_file():
        state = torch.load(opt_file, map_location="cpu", weights_only=True)
        ckpt.load_optimizer_state_dict(optimizer, state, model=sharded)
        if sched_file.is_file():
            scheduler.load_state_dict(torch.load(sched_file, map_location="cpu", weights_only=True))
        log.info("imported the Trainer's %s into the distopt-sharded optimizer", opt_file)
        return
    raise FileNotFoundError(
        f"DistoptTrainer: {checkpoint} has neither a distopt checkpoint ({SUBDIR}/) nor the "
        "Trainer's optimizer.pt; cannot restore the optimizer state"
    )
