"""Sharded checkpoints: save everything, resume exactly at any world size, survive crashes.

* :func:`save` / :func:`load` — collective over all ranks, on top of
  ``torch.distributed.checkpoint``; logical content keyed by parameter name and each
  optimizer's own state names; model, optimizer, scheduler, accumulator, per-rank RNG streams
  and user ``extra``.
  ``save(..., async_=True)`` copies and writes in the background (:func:`wait` joins it;
  every optimizer ``step`` waits for the copy, :func:`wait_snapshot` too).  Every failure,
  on any rank and in any phase, is one :class:`CheckpointError` raised on every rank.
* :class:`CheckpointManager` — ``step-N`` folders, atomic commits, rotation, ``latest()``,
  ``load_latest(fallback=True)`` stepping back past damaged checkpoints.
* :func:`load_optimizer_state_dict` / :func:`consolidate` — import a classic ``torch.save``d
  optimizer state dict into a sharded run; export a checkpoint back to that format.
"""

from distopt.checkpoint._async import release_staging, wait, wait_snapshot
from distopt.checkpoint._common import CheckpointError
from distopt.checkpoint._foreign import consolidate
from distopt.checkpoint._import import load_optimizer_state_dict, trainer_param_names
from distopt.checkpoint._manager import CheckpointManager
from distopt.checkpoint._save import save
from distopt.checkpoint._save_load import is_complete, load, read_meta, verify

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "consolidate",
    "is_complete",
    "load",
    "load_optimizer_state_dict",
    "read_meta",
    "release_staging",
    "save",
    "trainer_param_names",
    "verify",
    "wait",
    "wait_snapshot",
]
