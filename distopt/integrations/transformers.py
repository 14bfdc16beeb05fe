"""Hugging Face ``transformers.Trainer`` with distopt optimizers, schedules and ZeRO sharding.

::

    from transformers import TrainingArguments
    from distopt.integrations.transformers import DistoptTrainer

    args = TrainingArguments("out", per_device_train_batch_size=8, gradient_accumulation_steps=4,
                             learning_rate=2e-3, weight_decay=0.01, lr_scheduler_type="cosine",
                             warmup_steps=100, max_steps=10_000, save_steps=1000)
    trainer = DistoptTrainer(model=model, args=args, train_dataset=ds,
                             optim="lamb", zero_stage=2)       # any name of list_optimizers()
    trainer.train()                                             # resume_from_checkpoint=True works

What :class:`DistoptTrainer` changes, and nothing else (data, logging, evaluation, callbacks and
``save_pretrained`` stay the Trainer's):

* **Optimizer and schedule**: ``optim=`` takes any name of :func:`distopt.optim.list_optimizers`
  (``lookahead_<name>`` too), with ``optim_kwargs``; or, without ``optim=``, ``args.optim`` when it
  names an optimizer distopt has (``adamw_torch``, ``adamw_torch_fused``, ``adafactor``, ``sgd``,
  ``adagrad``, ``rmsprop``, ``schedule_free_adamw``, ``schedule_free_sgd``,
  ``schedule_free_radam``: same defaults as the Trainer's) with ``args.optim_args``
  (``"k=v,k2=v2"``, values read as Python literals).  Schedule-free optimizers are switched with
  ``optimizer.train()`` before each training step and ``optimizer.eval()`` by the Trainer's
  evaluation, as the Trainer does; a checkpoint taken after an evaluation keeps the averaged
  weights in ``model.safetensors`` and puts the optimizer back in train mode for distopt's
  state (use ``lr_scheduler_type="constant"``: the optimizer needs no schedule).  Param groups
  are the Trainer's (weight decay off for biases and norms), lr is ``args.learning_rate``.  The
  schedule is :func:`distopt.schedules.get_scheduler` of ``args.lr_scheduler_type`` (or
  ``schedule=``) with ``args.lr_scheduler_kwargs`` and the Trainer's warmup steps.  An optimizer passed as
  ``optimizers=(opt, sched)`` must be a distopt optimizer; it is sharded as well.
* **ZeRO** (``zero_stage=1|2``, default 2; ``None`` keeps the Trainer's DDP): the model is
  sharded with :func:`distopt.shard`, but ``trainer.model`` stays the user's module — its
  ``forward`` signature (so ``remove_unused_columns`` keeps the right columns), its tied weights
  and ``save_pretrained``/safetensors are untouched.  The Trainer trains ``trainer.model_wrapped``,
  which is the :class:`~distopt.zero.ShardedModule` (no DDP on top), so its ``no_sync`` and
  ``zero_grad`` are distopt's.  Gradients are clipped with :func:`distopt.clip_grad_norm_`.
* **Gradient accumulation** runs through :class:`distopt.GradientAccumulator`.  When the Trainer
  normalises by ``num_items_in_batch`` (a model that accepts loss kwargs, or ``compute_loss_func``)
  each micro-batch is backpropagated as the SUM of its items' losses with its local item count,
  and distopt divides the window's gradient once by the global count (one small all-reduce): the
  Trainer's own scalings (by ``num_items_in_batch``, by the number of processes) are undone, so
  nothing is scaled twice.  Otherwise the losses are means and the window's gradient is their
  mean, as in the Trainer.  A short last window of an epoch is flushed.
* **Checkpoints** (``save_steps``, ``resume_from_checkpoint``): with ZeRO, the optimizer,
  schedule and accumulator go through :func:`distopt.checkpoint.save` into
  ``checkpoint-N/distopt`` (every rank writes its rows; no ``optimizer.pt``/``scheduler.pt``), and
  are read back by :func:`distopt.checkpoint.load` at any world size.  The model weights stay in
  the Trainer's format (``model.safetensors``); the Trainer's per-rank ``rng_state_<i>.pth`` and
  ``trainer_state.json`` are unchanged and restored by the Trainer.  A checkpoint written by a
  plain Trainer (``optimizer.pt`` + ``scheduler.pt``) starts a sharded run through
  :func:`distopt.checkpoint.load_optimizer_state_dict` (same param groups, so use the same
  ``weight_decay`` split — the Trainer's default).  Without ZeRO (``zero_stage=None``) the
  Trainer's own ``optimizer.pt`` is written; such a run also resumes a ZeRO checkpoint.

Not supported (refused with an error): DeepSpeed and FSDP configs, ``nn.DataParallel`` (several
GPUs in one process), Adahessian, and — with several processes —
``average_tokens_across_devices=False`` when the loss is normalised by item counts (distopt
normalises by the global count).

Private Trainer methods this module overrides — all in :class:`_TrainerPrivateHooks` of
:mod:`distopt.integrations._transformers_private` (with the reasons), for the tested transformers
versions (:data:`TESTED_TRANSFORMERS`) only: ``_clip_grad_norm``, ``_get_grad_norm``,
``_save_optimizer_and_scheduler``, ``_load_optimizer_and_scheduler``; it also calls
``_prepare_inputs``, sets ``_created_lr_scheduler`` as the Trainer's own ``create_scheduler``
does, and relies on ``_wrap_model`` leaving ``model_wrapped`` (distopt's ShardedModule) as it is.

Modules: ``_transformers_private`` (the version check and every private Trainer API),
``_transformers_optim`` (optimizer and schedule named from ``TrainingArguments``),
``_transformers_accumulate`` (loss normalisation for accumulation), ``_transformers_checkpoint``
(distopt's state in the Trainer's checkpoints); this module holds :class:`DistoptTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "distopt.integrations.transformers needs the transformers package "
        "(pip install 'distopt[trainer]')"
    ) from exc

from distopt.integrations import _transformers_accumulate as _accumulate
from distopt.integrations import _transformers_checkpoint as _checkpoint
from distopt.integrations._transformers_optim import (
    build_optimizer,
    build_scheduler,
    inner_optimizer,
    is_distopt_optimizer,
    parse_optim_args,
    trainer_optimizer_names,
)
from distopt.integrations._transformers_private import (
    TESTED_TRANSFORMERS,
    _TrainerPrivateHooks,
    check_transformers_version,
)

__all__ = [
    "DistoptTrainer",
    "DistoptTrainerConfig",
    "TESTED_TRANSFORMERS",
    "check_transformers_version",
    "parse_optim_args",
    "trainer_optimizer_names",
]

# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DistoptTrainerConfig:
    """What :class:`DistoptTrainer` adds to ``TrainingArguments`` (see its docstring)."""

    zero_stage: int | None = 2
    optim: str | None = None
    optim_kwargs: dict[str, Any] = field(default_factory=dict)
    schedule: str | None = None
    schedule_kwargs: dict[str, Any] | None = None
    bucket_mb: float = 25.0
    master_dtype: torch.dtype | None = None
    reduce_every_micro_batch: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in (None, 1, 2):
            raise ValueError(
                f"DistoptTrainer: zero_stage must be None, 1 or 2, got {self.zero_stage!r}"
            )
        if self.optim is not None and not isinstance(self.optim, str):
            raise TypeError(
                f"DistoptTrainer: optim must be an optimizer name (str), got {type(self.optim).__name__}"
            )
        if not isinstance(self.optim_kwargs, dict):
            raise TypeError("DistoptTrainer: optim_kwargs must be a dict")
        if not isinstance(self.bucket_mb, (int, float)) or self.bucket_mb <= 0:
            raise ValueError(f"DistoptTrainer: bucket_mb must be > 0, got {self.bucket_mb!r}")


# --------------------------------------------------------------------------- the trainer


class DistoptTrainer(_TrainerPrivateHooks):
    """``transformers.Trainer`` with distopt optimizers, schedules, ZeRO and checkpoints.

    Args:
        *args, **kwargs: as for ``transformers.Trainer``.
        zero_stage: ``1`` or ``2`` (default) to shard with :func:`distopt.shard`; ``None`` for the
            Trainer's DDP (distopt optimizer and schedule, unsharded).
        optim: a distopt optimizer name (:func:`distopt.optim.list_optimizers`, optionally
            ``lookahead_``-prefixed).  Default: ``args.optim`` mapped to distopt (see
            :func:`trainer_optimizer_names`).
        optim_kwargs: optimizer arguments for ``optim`` (default: ``args.optim_args``).
        schedule: a :func:`distopt.schedules.get_scheduler` name (default
            ``args.lr_scheduler_type``); ``schedule_kwargs`` default to ``args.lr_scheduler_kwargs``.
        bucket_mb, master_dtype: passed to :func:`distopt.shard`.
        reduce_every_micro_batch: passed to :class:`distopt.GradientAccumulator`.

    Raises:
        RuntimeError: an untested transformers version (see :func:`check_transformers_version`).
        ValueError: DeepSpeed/FSDP configs, several GPUs in one process, an unknown ``optim``,
            ``average_tokens_across_devices=False`` with several processes.
    """

    def __init__(
        self,
        *args: Any,
        zero_stage: int | None = 2,
        optim: str | None = None,
        optim_kwargs: dict[str, Any] | None = None,
        schedule: str | None = None,
        schedule_kwargs: dict[str, Any] | None = None,
        bucket_mb: float = 25.0,
        master_dtype: torch.dtype | None = None,
        reduce_every_micro_batch: bool = False,
        **kwargs: Any,
    ) -> None:
        check_transformers_version()
        self.distopt_config = DistoptTrainerConfig(
            zero_stage=zero_stage,
            optim=optim,
            optim_kwargs=dict(optim_kwargs or {}),
            schedule=schedule,
            schedule_kwargs=None if schedule_kwargs is None else dict(schedule_kwargs),
            bucket_mb=bucket_mb,
            master_dtype=master_dtype,
            reduce_every_micro_batch=reduce_every_micro_batch,
        )
        self._distopt_sharded = None
        self._distopt_acc: Any = None
        self._distopt_acc_model: Any = None
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "DistoptTrainer: DeepSpeed and FSDP configs are not supported (they shard on their "
                "own); use zero_stage=1|2 for distopt ZeRO, or the plain Trainer with "
                "optimizers=(distopt optimizer, schedule) for FSDP2"
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                "DistoptTrainer: several GPUs in one process (nn.DataParallel) are not supported; "
                "launch one process per GPU (torchrun)"
            )
        if self.optimizer is not None and not is_distopt_optimizer(self.optimizer):
            raise TypeError(
                f"DistoptTrainer: optimizers=(...) holds a {type(self.optimizer).__module__}."
                f"{type(self.optimizer).__name__}; pass a distopt optimizer (distopt.optim.*), or "
                "use optim=<name>"
            )

    # ------------------------------------------------------------------ building
    def _build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(
            self.distopt_config, self.args, model, self.get_decay_parameter_names(model)
        )

    def _ensure_process_group(self) -> None:
        if dist.is_available() and dist.is_initialized():
            return
        if self.args.world_size > 1:
            raise RuntimeError(
                "DistoptTrainer: world_size > 1 but torch.distributed is not initialised"
            )
        # One process without a launcher: distopt ZeRO over a world of one.
        backend = "nccl" if self.args.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the distopt optimizer (or take the one passed in) and, with ZeRO, shard the model.

        The Trainer then trains the :class:`~distopt.zero.ShardedModule` (``model_wrapped``)
        while ``trainer.model`` stays the user's module.
        """
        if self._distopt_sharded is not None:  # already set up (a second train() call)
            return self.optimizer
        target = self.model if model is None else model
        if self.optimizer is None:
            self.optimizer = self._build_optimizer(target)
        inner = inner_optimizer(self.optimizer)
        if not is_distopt_optimizer(inner):
            raise TypeError(f"DistoptTrainer: {type(inner).__name__} is not a distopt optimizer")
        stage = self.distopt_config.zero_stage
        if stage is not None:
            import distopt

            self._ensure_process_group()
            sharded, _ = distopt.shard(
                self.model,
                inner,
                stage=stage,
                bucket_mb=self.distopt_config.bucket_mb,
                master_dtype=self.distopt_config.master_dtype,
            )
            self._distopt_sharded = sharded
            self._distopt_train_sharded(sharded)  # what the Trainer trains; not wrapped again
            if self.accelerator.mixed_precision != "no":
                # autocast on the user's forward, as accelerator.prepare would give it; no DDP
                self.accelerator.prepare_model(
                    self.model, device_placement=False, evaluation_mode=True
                )
            self._distopt_acc = distopt.GradientAccumulator(
                sharded,
                self.args.gradient_accumulation_steps,
                reduce_every_micro_batch=self.distopt_config.reduce_every_micro_batch,
            )
            self._distopt_acc_model = sharded
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The distopt schedule named by ``schedule=`` or ``args.lr_scheduler_type``."""
        if self.lr_scheduler is None:
            opt = inner_optimizer(optimizer if optimizer is not None else self.optimizer)
            self.lr_scheduler = build_scheduler(
                self.distopt_config, self.args, opt, num_training_steps
            )
            self._distopt_mark_scheduler_created()  # as the Trainer's: rebuilt per train()
        return self.lr_scheduler

    # ------------------------------------------------------------------ training step
    def _accumulator(self, model: nn.Module) -> Any:
        if self._distopt_sharded is not None:
            self._distopt_check_trained_model(model)
            return self._distopt_acc
        if self._distopt_acc is None or self._distopt_acc_model is not model:
            import distopt

            self._distopt_acc = distopt.GradientAccumulator(
                model, self.args.gradient_accumulation_steps
            )
            self._distopt_acc_model = model
        return self._distopt_acc

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """One micro-batch: forward, and backward through :class:`distopt.GradientAccumulator`.

        Returns the loss as the Trainer would report it.
        """
        acc = self._accumulator(model)
        boundary = bool(self.accelerator.sync_gradients)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._distopt_prepare_inputs(inputs)
        scaled = _accumulate.loss_is_scaled(self, num_items_in_batch)
        items_mode = scaled and num_items_in_batch is not None
        world = self.accelerator.num_processes
        _accumulate.check_item_normalisation(
            items_mode, world, self.args.average_tokens_across_devices
        )
        # Forward through the user's module under ZeRO (the engine works through parameter hooks),
        # so compute_loss sees the model the Trainer knows.
        fwd_model = self.model if self._distopt_sharded is not None else model
        num_items = _accumulate.count_items(self.model, inputs) if items_mode else None
        scaler = getattr(self.accelerator, "scaler", None)
        with acc.accumulate(num_items=num_items):
            with self.compute_loss_context_manager():
                loss = self.compute_loss(fwd_model, inputs, num_items_in_batch=num_items_in_batch)
            report, back = _accumulate.split_loss(
                loss,
                items_mode=items_mode,
                scaled=scaled,
                num_items_in_batch=num_items_in_batch,
                world=world,
                accumulation_steps=self.current_gradient_accumulation_steps,
            )
            acc.backward(scaler.scale(back) if scaler is not None else back)
        _accumulate.end_micro_batch(acc, boundary)
        del inputs
        return report

    # ------------------------------------------------------------------ checkpoints
    def _distopt_save(self, folder: Path) -> None:
        opt = inner_optimizer(self.optimizer)
        if getattr(opt, "train_mode", True) is False:
            # a schedule-free optimizer left in eval mode by the evaluation that precedes a
            # save: the Trainer's model.safetensors holds the averaged weights x (for
            # from_pretrained); distopt's folder gets y, z and train mode (to resume from).
            # The next training step would call optimizer.train() anyway.
            opt.train()
        _checkpoint.save(
            folder,
            sharded=self._distopt_sharded,
            optimizer=opt,
            scheduler=self.lr_scheduler,
            accumulator=self._distopt_acc,
            step=self.state.global_step,
        )

    def _distopt_load(self, checkpoint: Path) -> None:
        _checkpoint.load(
            checkpoint,
            sharded=self._distopt_sharded,
            model_wrapped=self.model_wrapped,
            optimizer=inner_optimizer(self.optimizer),
            scheduler=self.lr_scheduler,
            accumulator=self._distopt_acc,
        )
