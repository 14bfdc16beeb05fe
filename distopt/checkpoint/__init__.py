"""Sharded checkpoints: save everything, resume exactly at any world size, survive crashes.

* :func:`save` / :func:`load` — collective over all ranks, on top of
  ``torch.distributed.checkpoint``; logical content keyed by parameter name and each
  optimizer's own state names; model, optimizer, scheduler, accumulator, per-rank RNG streams
  and user ``extra``.
* :class:`CheckpointManager` — ``step-N`` folders, atomic commits, rotation, ``latest()``.
* :func:`load_optimizer_state_dict` / :func:`consolidate` — import a classic ``torch.save``d
  optimizer state dict into a sharded run; export a checkpoint back to that format.
"""

from distopt.checkpoint._foreign import consolidate, load_optimizer_state_dict
from distopt.checkpoint._manager import CheckpointManager
from distopt.checkpoint._save_load import (
    CheckpointError,
    is_complete,
    load,
    read_meta,
    save,
    verify,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "consolidate",
    "is_complete",
    "load",
    "load_optimizer_state_dict",
    "read_meta",
    "save",
    "verify",
]
