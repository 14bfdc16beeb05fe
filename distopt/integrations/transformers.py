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
  ``adagrad``, ``rmsprop``: same defaults as the Trainer's) with ``args.optim_args``
  (``"k=v,k2=v2"``, values read as Python literals).  Param groups are the Trainer's (weight decay
  off for biases and norms), lr is ``args.learning_rate``.  The schedule is
  :func:`distopt.schedules.get_scheduler` of ``args.lr_scheduler_type`` (or ``schedule=``) with
  ``args.lr_scheduler_kwargs`` and the Trainer's warmup steps.  An optimizer passed as
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

Private Trainer methods this module overrides — all in :class:`_TrainerPrivateHooks`, for the
tested transformers versions (:data:`TESTED_TRANSFORMERS`) only: ``_clip_grad_norm``,
``_get_grad_norm``, ``_save_optimizer_and_scheduler``, ``_load_optimizer_and_scheduler``; it also
calls ``_prepare_inputs`` and sets ``_created_lr_scheduler`` as the Trainer's own
``create_scheduler`` does.
"""

from __future__ import annotations

import ast
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    import transformers
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "distopt.integrations.transformers needs the transformers package "
        "(pip install 'distopt[trainer]')"
    ) from exc

__all__ = [
    "DistoptTrainer",
    "DistoptTrainerConfig",
    "TESTED_TRANSFORMERS",
    "check_transformers_version",
    "parse_optim_args",
    "trainer_optimizer_names",
]

log = logging.getLogger("distopt.integrations.transformers")

#: transformers versions this integration is tested with: ``(lowest, first untested)``
TESTED_TRANSFORMERS: tuple[str, str] = ("5.24.0", "5.25.0")
#: sub-folder of a Trainer checkpoint that holds distopt's sharded state
SUBDIR = "distopt"
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


# --------------------------------------------------------------------------- optimizer names


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """``"a=1,betas=(0.9,0.95),foo=true"`` -> ``{"a": 1, "betas": (0.9, 0.95), "foo": True}``.

    Values are Python literals (``true``/``false`` accepted); a value that is not a literal stays
    a string.  Commas inside brackets do not split.
    """
    if not text:
        return {}
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    out: dict[str, Any] = {}
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(
                f"optim_args: expected key=value items separated by commas, got {part!r} in {text!r}"
            )
        key, value = (s.strip() for s in part.split("=", 1))
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _trainer_optim(args: Any) -> tuple[Any, dict[str, Any]] | None:
    """The distopt class and kwargs for ``args.optim`` (the Trainer's defaults), or None."""
    import distopt.optim as dopt

    name = str(getattr(args.optim, "value", args.optim))
    adam = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    table: dict[str, tuple[Any, dict[str, Any]]] = {
        "adamw_torch": (dopt.AdamW, adam),
        "adamw_torch_fused": (dopt.AdamW, adam),
        "adafactor": (dopt.Adafactor, {"scale_parameter": False, "relative_step": False}),
        "sgd": (dopt.SGD, {}),
        "adagrad": (dopt.Adagrad, {}),
        "rmsprop": (dopt.RMSprop, {}),
    }
    if name not in table:
        return None
    cls, kw = table[name]
    return cls, dict(kw)


def trainer_optimizer_names() -> list[str]:
    """The ``TrainingArguments.optim`` values :class:`DistoptTrainer` maps to distopt."""
    return ["adafactor", "adagrad", "adamw_torch", "adamw_torch_fused", "rmsprop", "sgd"]


def _is_distopt_optimizer(opt: Any) -> bool:
    from distopt.optim._core import DistOptimizer
    from distopt.optim.lookahead import Lookahead

    return isinstance(opt, (DistOptimizer, Lookahead))


def _inner(opt: Any) -> Any:
    """The optimizer inside Accelerate's ``AcceleratedOptimizer`` (or ``opt`` itself)."""
    return getattr(opt, "optimizer", opt) if type(opt).__name__ == "AcceleratedOptimizer" else opt


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


# --------------------------------------------------------------------------- private overrides


class _TrainerPrivateHooks(Trainer):
    """Every override of a private ``Trainer`` method, in one place (see the module docstring).

    Each one hands over to the Trainer's own method when distopt ZeRO is not in use.
    """

    _distopt_sharded: Any = None  # the ShardedModule (ZeRO), else None

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

    # implemented by DistoptTrainer
    def _distopt_save(self, folder: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _distopt_load(self, checkpoint: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


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
        if self.optimizer is not None and not _is_distopt_optimizer(self.optimizer):
            raise TypeError(
                f"DistoptTrainer: optimizers=(...) holds a {type(self.optimizer).__module__}."
                f"{type(self.optimizer).__name__}; pass a distopt optimizer (distopt.optim.*), or "
                "use optim=<name>"
            )

    # ------------------------------------------------------------------ building
    def _build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        import distopt.optim as dopt

        cfg = self.distopt_config
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        # both groups even when one is empty, as the Trainer builds them: a Trainer optimizer.pt
        # then imports position by position
        if cfg.optim is not None:
            base = (
                cfg.optim[len("lookahead_") :] if cfg.optim.startswith("lookahead_") else cfg.optim
            )
            names = dopt.list_optimizers()
            if base not in names and cfg.optim not in names:
                raise ValueError(
                    f"DistoptTrainer: unknown optimizer {cfg.optim!r}; distopt has "
                    f"{', '.join(names)} (each optionally prefixed 'lookahead_')"
                )
            if base == "adahessian":
                raise ValueError(
                    "DistoptTrainer: adahessian needs a backward with create_graph=True on the "
                    "whole model, which the Trainer does not run; pick another optimizer"
                )
            kwargs = (
                cfg.optim_kwargs if cfg.optim_kwargs else parse_optim_args(self.args.optim_args)
            )
            return dopt.create_optimizer_v2(
                groups,
                opt=cfg.optim,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                **kwargs,
            )
        mapped = _trainer_optim(self.args)
        if mapped is None:
            raise ValueError(
                f"DistoptTrainer: TrainingArguments.optim={getattr(self.args.optim, 'value', self.args.optim)!r} "
                f"has no distopt equivalent; use one of {', '.join(trainer_optimizer_names())}, or "
                "name any distopt optimizer with DistoptTrainer(optim=...) (distopt.optim.list_optimizers())"
            )
        cls, kwargs = mapped
        kwargs.update(
            cfg.optim_kwargs if cfg.optim_kwargs else parse_optim_args(self.args.optim_args)
        )
        return cls(groups, lr=self.args.learning_rate, **kwargs)

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
        inner = _inner(self.optimizer)
        if not _is_distopt_optimizer(inner):
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
            self.model_wrapped = sharded  # what the Trainer trains; not wrapped again
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
            from distopt.schedules import get_scheduler

            opt = _inner(optimizer if optimizer is not None else self.optimizer)
            cfg = self.distopt_config
            name = cfg.schedule if cfg.schedule is not None else self.args.lr_scheduler_type
            kwargs = (
                cfg.schedule_kwargs
                if cfg.schedule_kwargs is not None
                else self.args.lr_scheduler_kwargs
            )
            self.lr_scheduler = get_scheduler(
                name,
                opt,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=kwargs or None,
            )
            self._created_lr_scheduler = (
                True  # as the Trainer's create_scheduler: rebuilt per train()
            )
        return self.lr_scheduler

    # ------------------------------------------------------------------ training step
    def _accumulator(self, model: nn.Module) -> Any:
        if self._distopt_sharded is not None:
            if model is not self._distopt_sharded:
                raise RuntimeError(
                    f"DistoptTrainer: the Trainer trains a {type(model).__name__}, not distopt's "
                    "ShardedModule: this transformers version wraps models differently from the "
                    f"tested ones ({TESTED_TRANSFORMERS[0]} to <{TESTED_TRANSFORMERS[1]})"
                )
            return self._distopt_acc
        if self._distopt_acc is None or self._distopt_acc_model is not model:
            import distopt

            self._distopt_acc = distopt.GradientAccumulator(
                model, self.args.gradient_accumulation_steps
            )
            self._distopt_acc_model = model
        return self._distopt_acc

    def _loss_is_scaled(self, num_items_in_batch: Any) -> bool:
        """The Trainer's rule: is ``compute_loss``'s value already scaled for accumulation?"""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (
            bool(self.model_accepts_loss_kwargs) and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def _count_items(self, inputs: dict[str, Any]) -> Tensor:
        """This micro-batch's item count, by the Trainer's rule for ``num_items_in_batch``."""
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

        if "shift_labels" in inputs:
            labels = inputs["shift_labels"]
        else:
            labels = inputs["labels"]
            shifts = LOSS_MAPPING.get(
                getattr(self.model, "loss_type", None)
            ) is ForCausalLMLoss and not getattr(
                getattr(self.model, "config", None), "is_encoder_decoder", False
            )
            if shifts:
                labels = labels[..., 1:]
        return labels.ne(-100).sum()

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
        inputs = self._prepare_inputs(inputs)
        scaled = self._loss_is_scaled(num_items_in_batch)
        items_mode = scaled and num_items_in_batch is not None
        world = self.accelerator.num_processes
        if items_mode and world > 1 and not self.args.average_tokens_across_devices:
            raise ValueError(
                "DistoptTrainer: average_tokens_across_devices=False normalises each rank's loss by "
                "its own item count; distopt normalises by the global count. Set "
                "average_tokens_across_devices=True"
            )
        # Forward through the user's module under ZeRO (the engine works through parameter hooks),
        # so compute_loss sees the model the Trainer knows.
        fwd_model = self.model if self._distopt_sharded is not None else model
        num_items = self._count_items(inputs) if items_mode else None
        scaler = getattr(self.accelerator, "scaler", None)
        with acc.accumulate(num_items=num_items):
            with self.compute_loss_context_manager():
                loss = self.compute_loss(fwd_model, inputs, num_items_in_batch=num_items_in_batch)
            if items_mode:
                # The Trainer's loss is sum / num_items_in_batch * world (global count): make it
                # the local SUM; distopt divides by the global count once, at the boundary.
                report = loss.detach()
                back = loss * (num_items_in_batch / world)
            elif scaled:
                # already normalised over the window without item counts: distopt's mean over
                # the window's micro-batches must not divide it again
                report = loss.detach()
                back = loss * self.current_gradient_accumulation_steps
            else:  # a mean per micro-batch: distopt takes the mean over the window
                report = loss.detach() / self.current_gradient_accumulation_steps
                back = loss
            acc.backward(scaler.scale(back) if scaler is not None else back)
        if boundary and not acc.sync_gradients:
            acc.flush()  # a short last window of the epoch
        elif acc.sync_gradients and not boundary:
            raise RuntimeError(
                "DistoptTrainer: distopt's accumulator reached an optimizer step where the Trainer "
                "did not (gradient_accumulation_steps changed during training?)"
            )
        del inputs
        return report

    # ------------------------------------------------------------------ checkpoints
    def _distopt_save(self, folder: Path) -> None:
        import distopt.checkpoint as ckpt

        ckpt.save(
            folder,
            model=self._distopt_sharded,
            optimizer=_inner(self.optimizer),
            scheduler=self.lr_scheduler,
            accumulator=self._distopt_acc,
            extra={"step": int(self.state.global_step), "written_by": "DistoptTrainer"},
        )

    def _distopt_load(self, checkpoint: Path) -> None:
        import distopt.checkpoint as ckpt

        folder = checkpoint / SUBDIR
        opt = _inner(self.optimizer)
        if folder.exists():
            sharded = self._distopt_sharded is not None
            ckpt.load(
                folder,
                model=self._distopt_sharded if sharded else self.model_wrapped,
                optimizer=opt,
                scheduler=self.lr_scheduler,
                accumulator=self._distopt_acc if sharded else None,
                restore_rng=False,  # the Trainer restores its RNG
            )
            log.info("restored distopt optimizer, schedule and accumulator from %s", folder)
            return
        opt_file, sched_file = checkpoint / "optimizer.pt", checkpoint / "scheduler.pt"
        if opt_file.is_file():
            state = torch.load(opt_file, map_location="cpu", weights_only=True)
            ckpt.load_optimizer_state_dict(opt, state, model=self._distopt_sharded)
            if sched_file.is_file():
                self.lr_scheduler.load_state_dict(
                    torch.load(sched_file, map_location="cpu", weights_only=True)
                )
            log.info("imported the Trainer's %s into the distopt-sharded optimizer", opt_file)
            return
        raise FileNotFoundError(
            f"DistoptTrainer: {checkpoint} has neither a distopt checkpoint ({SUBDIR}/) nor the "
            "Trainer's optimizer.pt; cannot restore the optimizer state"
        )
