"""The private ``transformers.Trainer`` APIs distopt uses, in one place, behind a version check.

:class:`~distopt.integrations.transformers.DistoptTrainer` needs a few things the Trainer only
offers through private methods and attributes.  All of them are here, in
:class:`_TrainerPrivateHooks`, and only for the tested transformers versions
(:data:`TESTED_TRANSFORMERS`, enforced by :func:`check_transformers_version`); the rest of the
integration uses the Trainer's public API.  What is used, and why there is no public way:

* overrides ``_clip_grad_norm`` and ``_get_grad_norm``: the training loop clips with
  ``accelerator.clip_grad_norm_(model.parameters())`` between backward and
  ``optimizer.step()``; a ZeRO-sharded model needs :func:`distopt.clip_grad_norm_` (the norm of
  the whole gradient, not of the local rows), and no callback can replace the Trainer's clipping.
* overrides ``_save_optimizer_and_scheduler`` and ``_load_optimizer_and_scheduler``: the Trainer
  writes ``optimizer.state_dict()`` from the saving process only (``args.should_save``) and reads
  it back with ``torch.load``; sharded state must be written and read on every rank through
  :mod:`distopt.checkpoint`, and no callback can replace the Trainer's own optimizer files or
  their loading.
* calls ``_prepare_inputs``: :meth:`DistoptTrainer.training_step` (public, overridden) must place
  and check the batch exactly as the Trainer's own ``training_step`` does.
* sets ``_created_lr_scheduler``: the Trainer rebuilds the schedule on each ``train()`` only when
  this flag is set, which its own ``create_scheduler`` does; the overridden (public)
  ``create_scheduler`` must set it too.
* relies on ``_wrap_model``: the Trainer's training set-up passes ``model_wrapped`` through
  ``_wrap_model`` and puts DDP on top (``accelerator.prepare(model)``) only when the result is
  ``trainer.model``.  distopt sets ``model_wrapped`` to its
  :class:`~distopt.zero.ShardedModule` so that the Trainer trains it as it is; nothing public
  tells the Trainer that a model already distributes itself (outside DeepSpeed/FSDP configs).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import Trainer

from distopt.integrations._transformers_checkpoint import SUBDIR

__all__ = ["TESTED_TRANSFORMERS", "check_transformers_version"]

log = logging.getLogger("distopt.integrations.transformers")

#: transformers versions this integration is tested with: ``(lowest, first untested)``
TESTED_TRANSFORMERS: tuple[str, str] = ("5.24.0", "5.25.0")
_SKIP_CHECK_ENV = "DISTOPT_TRAINER_SKIP_VERSION_CHECK"


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    while len(out) < 3:
        out.append(0)
    return tuple(out)


def check_transformers_version(version: str | None = None) -> str:
    """Raise unless ``version`` (default: the installed transformers) is in the tested range.

    :class:`DistoptTrainer` overrides a few private Trainer methods, whose names and call order
    change between releases; outside :data:`TESTED_TRANSFORMERS` it could silently stop clipping
    or checkpointing sharded state, so it refuses.  Setting the environment variable
    ``DISTOPT_TRAINER_SKIP_VERSION_CHECK=1`` turns the error into a warning (at your own risk).
    """
    version = transformers.__version__ if version is None else version
    lo, hi = TESTED_TRANSFORMERS
    if _version_tuple(lo) <= _version_tuple(version) < _version_tuple(hi):
        return version
    msg = (
        f"distopt.integrations.transformers is tested with transformers>={lo},<{hi}; "
        f"transformers {version} is installed. Install a tested version "
        f"(pip install 'transformers>={lo},<{hi}') or set {_SKIP_CHECK_ENV}=1 to try anyway"
    )
    if os.environ.get(_SKIP_CHECK_ENV) == "1":
        log.warning(msg)
        return version
    raise RuntimeError(msg)


class _TrainerPrivateHooks(Trainer):
    """Every use of a private ``Trainer`` method or attribute, in one place (see the module docstring).

    Each override hands over to the Trainer's own method when distopt ZeRO is not in use.
    """

    _distopt_sharded: Any = None  # the ShardedModule (ZeRO), else None

    # ------------------------------------------------------------------ overrides
    def _clip_grad_norm(self, model: nn.Module) -> Any:
        if self._distopt_sharded is None:
            return super()._clip_grad_norm(model)
        import distopt

        self.accelerator.unscale_gradients()
        return distopt.clip_grad_norm_(self._distopt_sharded, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if self._distopt_sharded is None or grad_norm is not None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        import distopt

        self.accelerator.unscale_gradients()
        return distopt.clip_grad_norm_(self._distopt_sharded, math.inf)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._distopt_sharded is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        self._distopt_save(Path(output_dir) / SUBDIR)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        if self._distopt_sharded is None:
            has_trainer_files = (Path(checkpoint) / "optimizer.pt").is_file()
            if has_trainer_files or not (Path(checkpoint) / SUBDIR).exists():
                return super()._load_optimizer_and_scheduler(checkpoint)
            # a ZeRO checkpoint resumed without ZeRO (DDP / one process): distopt reads it
        self._distopt_load(Path(checkpoint))

    # ------------------------------------------------------------------ calls and reliances
    def _distopt_prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch placed and checked as the Trainer's own ``training_step`` does."""
        return self._prepare_inputs(inputs)

    def _distopt_mark_scheduler_created(self) -> None:
        """As the Trainer's ``create_scheduler``: the schedule is rebuilt on each ``train()``."""
        self._created_lr_scheduler = True

    def _distopt_train_sharded(self, sharded: nn.Module) -> None:
        """Make ``sharded`` what the Trainer trains, not wrapped again.

        The Trainer's ``_wrap_model`` returns it unchanged and, as it is not ``trainer.model``,
        the Trainer prepares only the optimizer with Accelerate (no DDP on top);
        :meth:`_distopt_check_trained_model` verifies this at each training step.
        """
        self.model_wrapped = sharded

    def _distopt_check_trained_model(self, model: nn.Module) -> None:
        """Raise unless the Trainer trains distopt's ShardedModule (see :meth:`_distopt_train_sharded`)."""
        if model is not self._distopt_sharded:
            raise RuntimeError(
                f"DistoptTrainer: the Trainer trains a {type(model).__name__}, not distopt's "
                "ShardedModule: this transformers version wraps models differently from the "
                f"tested ones ({TESTED_TRANSFORMERS[0]} to <{TESTED_TRANSFORMERS[1]})"
            )

    # implemented by DistoptTrainer
    def _distopt_save(self, folder: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _distopt_load(self, checkpoint: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
