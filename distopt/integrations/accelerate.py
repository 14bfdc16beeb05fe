"""Hugging Face Accelerate with distopt optimizers (sharded or not) and schedules.

::

    from accelerate import Accelerator
    from distopt.integrations.accelerate import prepare

    accelerator = Accelerator(gradient_accumulation_steps=4)
    optimizer = distopt.optim.AdamW(model.parameters(), lr=3e-4)
    scheduler = distopt.schedules.get_cosine_schedule_with_warmup(optimizer, 100, 10_000)
    model, optimizer, scheduler, loader = prepare(
        accelerator, model, optimizer, scheduler, loader, zero_stage=2)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(batch))
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
    accelerator.save_state("ckpt")      # ... later, in a fresh launch: accelerator.load_state("ckpt")

:func:`prepare` is ``accelerator.prepare`` plus four things:

1. **distopt ZeRO** (``zero_stage=1|2``): the model and its distopt optimizer go through
   :func:`distopt.shard`; the sharded model is registered with Accelerate (device placement,
   autocast, ``accumulate``/``no_sync``) but not wrapped in DDP (distopt does the gradient
   synchronisation).  Without ``zero_stage`` the model is prepared as usual (DDP).
2. **Schedules step once per optimizer step**, at any number of processes.  Accelerate, by
   default, steps a prepared scheduler ``num_processes`` times per optimizer step (it assumes a
   schedule sized in single-process batches); distopt schedules count optimizer steps, so the
   prepared scheduler steps exactly once when the optimizer really stepped (not on accumulation
   micro-steps, not after a skipped fp16 step), whatever ``step_scheduler_with_optimizer`` and
   ``split_batches`` say.
3. **Complete checkpoints**: ``accelerator.save_state(dir)`` writes each distopt model/optimizer
   pair (with its scheduler and accumulator) through :func:`distopt.checkpoint.save` into
   ``dir/distopt`` (``dir/distopt_<i>`` for the i-th pair after the first): every rank writes its
   own rows of the sharded state.  ``accelerator.load_state(dir)`` reads it back on every rank,
   at any world size.  Accelerate's own ``optimizer.bin`` then holds a marker only (a plain
   optimizer state dict from rank 0 cannot hold sharded state) and its model file is not
   written for these models (the distopt checkpoint has the weights; ``distopt ckpt
   consolidate`` exports them).
4. **Checks**: a shape-aware distopt optimizer under a DeepSpeed plugin is refused up front
   (see :mod:`distopt.integrations.deepspeed`); ``accelerator.save_state`` under an FSDP plugin
   raises and points to :func:`distopt.checkpoint.save` (Accelerate's FSDP optimizer saving
   does not know distopt's row shards).

Gradient accumulation: ``accelerator.accumulate(model)`` works with sharded and unsharded
models (off-boundary micro-batches run in the model's ``no_sync``); the window's gradient is the
mean of the micro-batch means.  To normalise by item counts (tokens) use
:class:`GradientAccumulator`, which drives distopt's accumulator and keeps Accelerate's
``sync_gradients`` (and with it ``optimizer.step``, ``zero_grad`` and the scheduler) on the same
boundaries.  Clip sharded gradients with :func:`distopt.clip_grad_norm_` (``accelerator.
clip_grad_norm_`` does not know shards).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distopt._accelerate_private import held_models, mark_prepared, set_sync_gradients
from distopt.parallel import backend_for

__all__ = ["GradientAccumulator", "checkpoint_dirs", "kwargs_handlers", "prepare"]

log = logging.getLogger("distopt.integrations.accelerate")

MARKER_KEY = "distopt_checkpoint"
SUBDIR = "distopt"


# --------------------------------------------------------------------------- helpers


def _is_distopt_optimizer(opt: Any) -> bool:
    from distopt.optim._core import DistOptimizer
    from distopt.optim.lookahead import Lookahead

    return isinstance(opt, (DistOptimizer, Lookahead))


def _inner_optimizer(opt: Any) -> Any:
    """The user's optimizer inside an AcceleratedOptimizer (or the object itself)."""
    return getattr(opt, "optimizer", opt) if type(opt).__name__.endswith("AcceleratedOptimizer") else opt


def _is_scheduler(obj: Any) -> bool:
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler) or (
        hasattr(obj, "step") and hasattr(obj, "optimizer") and hasattr(obj, "state_dict")
        and not isinstance(obj, torch.optim.Optimizer)
    )


def _distributed_type(accelerator: Any) -> str:
    return str(getattr(accelerator, "distributed_type", "NO")).split(".")[-1]


def _param_ids(opt: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


def _same_model(held: Any, model: nn.Module) -> bool:
    """Whether an entry of ``accelerator._models`` is ``model`` (or the module DDP wraps)."""
    return held is model or held is getattr(model, "module", None) or getattr(held, "module", None) is model


def checkpoint_dirs(output_dir: str | Path, n: int) -> list[Path]:
    """The folders of ``n`` distopt checkpoints inside an Accelerate state folder."""
    root = Path(output_dir)
    return [root / (SUBDIR if i == 0 else f"{SUBDIR}_{i}") for i in range(n)]


# --------------------------------------------------------------------------- our Accelerate objects
# Created lazily (Accelerate is imported only when used).  The optimizer is built by distopt and
# handed to ``accelerator.prepare`` as already prepared, so Accelerate keeps (and saves through)
# this object; the scheduler wraps the user's scheduler like Accelerate's does, and is what
# ``prepare`` returns (Accelerate's own copy only saves and loads the same inner scheduler).

_CLASSES: dict[str, type] = {}


def _optimizer_class() -> type:
    if "opt" not in _CLASSES:
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.scheduler import AcceleratedScheduler

        class DistoptAcceleratedOptimizer(AcceleratedOptimizer):
            """AcceleratedOptimizer whose state travels through distopt.checkpoint in
            ``accelerator.save_state`` / ``load_state``."""

            def state_dict(self) -> dict[str, Any]:
                folder = self.__dict__.pop("_distopt_saving", None)
                if folder is not None:  # inside accelerator.save_state: a marker only
                    return {MARKER_KEY: str(folder), "format": 1}
                return super().state_dict()

            def load_state_dict(self, state_dict: dict[str, Any]) -> None:
                if isinstance(state_dict, dict) and MARKER_KEY in state_dict:
                    if self.__dict__.pop("_distopt_loaded", None) is None:
                        raise RuntimeError(
                            "this optimizer state is a distopt marker: the real state is in the "
                            f"distopt checkpoint {state_dict[MARKER_KEY]!r}; restore it with "
                            "accelerator.load_state on an accelerator prepared by "
                            "distopt.integrations.accelerate.prepare (or distopt.checkpoint.load)"
                        )
                    return
                if _is_sharded(self.optimizer):
                    raise RuntimeError(
                        "a plain optimizer state dict cannot restore distopt ZeRO-sharded state "
                        "(Accelerate saves rank 0's shard only); this checkpoint was not written "
                        "with distopt's Accelerate hooks: load it into an unsharded run, or use "
                        "distopt.checkpoint"
                    )
                super().load_state_dict(state_dict)

        class DistoptAcceleratedScheduler(AcceleratedScheduler):
            """AcceleratedScheduler that steps once per real optimizer step, at any world size."""

            @classmethod
            def like(cls, prepared: Any) -> DistoptAcceleratedScheduler:
                """The same scheduler and optimizers as Accelerate's ``prepared`` wrapper."""
                return cls(prepared.scheduler, prepared.optimizers, prepared.step_with_optimizer,
                           prepared.split_batches)

            def step(self, *args: Any, **kwargs: Any) -> None:
                if not self.gradient_state.sync_gradients:
                    return  # accumulation micro-step: the optimizer did not step
                for opt in self.optimizers:
                    if getattr(opt, "step_was_skipped", False):
                        return  # fp16 overflow: the optimizer step was skipped
                self.scheduler.step(*args, **kwargs)

        _CLASSES["opt"] = DistoptAcceleratedOptimizer
        _CLASSES["sched"] = DistoptAcceleratedScheduler
    return _CLASSES["opt"]


def _scheduler_base() -> type:
    from accelerate.scheduler import AcceleratedScheduler

    return AcceleratedScheduler


def _scheduler_class() -> type:
    _optimizer_class()
    return _CLASSES["sched"]


def _is_sharded(opt: Any) -> bool:
    """Whether ``opt``'s param groups hold distopt ZeRO row shards."""
    fn = getattr(opt, "shard_spec", None)
    return fn is not None and any(fn(p) is not None for g in opt.param_groups for p in g["params"])


# --------------------------------------------------------------------------- registry


@dataclass
class _Pair:
    model: nn.Module  # as trained (ShardedModule or DDP/plain)
    accelerated: Any  # the AcceleratedOptimizer
    optimizer: torch.optim.Optimizer  # the distopt optimizer inside it
    scheduler: Any = None  # the user's scheduler (not the Accelerate wrapper)
    accumulator: Any = None  # distopt.GradientAccumulator

    def objects(self) -> dict[str, Any]:
        """The keyword arguments of ``distopt.checkpoint.save`` / ``load`` for this pair."""
        acc = self.accumulator.inner if self.accumulator is not None else None
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "accumulator": acc}


class _Registry:
    """What ``accelerator.save_state`` / ``load_state`` save and load through distopt."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.pairs: list[_Pair] = []
        self.handles = [
            accelerator.register_save_state_pre_hook(self.save_hook),
            accelerator.register_load_state_pre_hook(self.load_hook),
        ]

    def prune(self) -> None:
        """Forget pairs whose model the accelerator no longer holds (``free_memory``)."""
        held = held_models(self.accelerator)
        if held is not None:
            self.pairs = [p for p in self.pairs if any(_same_model(m, p.model) for m in held)]

    def pair_of_model(self, model: nn.Module) -> _Pair | None:
        for p in self.pairs:
            if _same_model(model, p.model):
                return p
        return None

    def save_hook(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        import distopt.checkpoint as ckpt

        self.prune()
        if not self.pairs:
            return
        kind = _distributed_type(self.accelerator)
        if kind == "FSDP":
            raise RuntimeError(
                "accelerator.save_state with an FSDP plugin cannot save distopt optimizer state "
                "(Accelerate's FSDP optimizer saving does not know distopt's row shards); call "
                "distopt.checkpoint.save(path, model=model, optimizer=optimizer, "
                "scheduler=scheduler) on every rank instead"
            )
        for pair, folder in zip(self.pairs, checkpoint_dirs(output_dir, len(self.pairs))):
            ckpt.save(folder, **pair.objects())
            pair.accelerated.__dict__["_distopt_saving"] = folder.name
        # Accelerate's model file would duplicate the weights the distopt checkpoint holds.
        idx = [i for i, m in enumerate(models) if any(_same_model(m, p.model) for p in self.pairs)]
        for i in reversed(idx):
            if i < len(weights):
                weights.pop(i)

    def load_hook(self, models: list[Any], input_dir: str) -> None:
        import distopt.checkpoint as ckpt

        self.prune()
        if not self.pairs:
            return
        for pair, folder in zip(self.pairs, checkpoint_dirs(input_dir, len(self.pairs))):
            if not folder.exists():
                raise ckpt.CheckpointError(
                    f"{input_dir} has no distopt checkpoint {folder.name!r}: it was not saved by "
                    "accelerator.save_state on an accelerator prepared by "
                    "distopt.integrations.accelerate.prepare with the same models and optimizers"
                )
            ckpt.load(folder, **pair.objects())
            pair.accelerated.__dict__["_distopt_loaded"] = True
        idx = [i for i, m in enumerate(models) if any(_same_model(m, p.model) for p in self.pairs)]
        for i in reversed(idx):
            models.pop(i)


def _registry(accelerator: Any) -> _Registry:
    reg = getattr(accelerator, "_distopt_registry", None)
    if reg is None:
        reg = _Registry(accelerator)
        accelerator._distopt_registry = reg
    return reg


# --------------------------------------------------------------------------- prepare


def _keep_client_optimizer_under_offload(opt: Any, cfg: dict[str, Any]) -> None:
    """Under ZeRO-Offload Accelerate swaps a client optimizer for DeepSpeed's CPU Adam unless
    ``zero_force_ds_cpu_optimizer`` is false: keep the distopt optimizer, and say what runs."""
    zero = cfg.get("zero_optimization") or {}
    device = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    if device in ("none", ""):
        return
    if cfg.get("zero_force_ds_cpu_optimizer") is True:
        raise ValueError(
            f"DeepSpeed config: offload_optimizer.device={device!r} with zero_force_ds_cpu_optimizer"
            f"=true would replace distopt's {type(opt).__name__} by DeepSpeed's CPU Adam; set it to "
            "false to run the distopt optimizer on the offloaded partitions"
        )
    cfg["zero_force_ds_cpu_optimizer"] = False
    logging.getLogger("distopt.integrations.deepspeed").warning(
        "ZeRO-Offload (offload_optimizer.device=%s): distopt's %s runs on DeepSpeed's fp32 "
        "partitions on the CPU, with its state there; it is NOT replaced by DeepSpeed's CPUAdam "
        "(zero_force_ds_cpu_optimizer set to false). Expect CPU-bound optimizer steps.",
        device, type(opt).__name__,
    )



def kwargs_handlers() -> list[Any]:
    """``Accelerator(kwargs_handlers=...)`` that make CPU-only launches form a real group.

    Without a GPU, Accelerate picks no process-group backend under a DeepSpeed config (each
    process then believes it is alone) and under its torchrun launcher; this returns
    ``[InitProcessGroupKwargs(backend="gloo")]`` in a launched process (``LOCAL_RANK`` set) on a
    machine without CUDA, else ``[]``.  (For the multi-CPU config also set
    ``ACCELERATE_USE_CPU=1``; see launch/accelerate/multi-cpu.yaml.)
    """
    launched = os.environ.get("LOCAL_RANK") is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torch.cuda.is_available() or not launched:
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]



def prepare(
    accelerator: Any,
    *objects: Any,
    zero_stage: int | None = None,
    bucket_mb: float = 25.0,
    master_dtype: torch.dtype | None = None,
    device_placement: list[bool] | None = None,
) -> Any:
    """``accelerator.prepare(*objects)`` for distopt optimizers and schedules.

    Args:
        accelerator: an ``accelerate.Accelerator``.
        *objects: models, optimizers, schedulers, data loaders — as for ``accelerator.prepare``.
        zero_stage: ``1`` or ``2`` to shard the optimizer state (and gradients) with
            :func:`distopt.shard`; then ``objects`` holds exactly one model and one distopt
            optimizer on its parameters.  ``None`` (default): the model is prepared by Accelerate
            (DDP when distributed).
        bucket_mb, master_dtype: passed to :func:`distopt.shard`.
        device_placement: passed to ``accelerator.prepare``.

    Returns:
        The prepared objects, in order (one object if one was given), as ``accelerator.prepare``.

    Raises:
        ValueError: ``zero_stage`` with a DeepSpeed/FSDP plugin, without exactly one model and one
            distopt optimizer, or an optimizer not on the model's parameters; a shape-aware
            optimizer under a DeepSpeed plugin that flattens parameters.
    """
    kind = _distributed_type(accelerator)
    objects = list(objects)
    optimizers = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
    models = [o for o in objects if isinstance(o, nn.Module)]

    if kind == "DEEPSPEED":
        if zero_stage is not None:
            raise ValueError(
                "prepare: zero_stage (distopt ZeRO) and a DeepSpeed plugin exclude each other; "
                "use DeepSpeed's zero_stage in the plugin, or a multi-GPU/CPU config with distopt ZeRO"
            )
        from distopt.integrations.deepspeed import check_optimizer

        cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        for opt in optimizers:
            if _is_distopt_optimizer(opt):
                check_optimizer(opt, cfg)
                _keep_client_optimizer_under_offload(opt, cfg)
        out = accelerator.prepare(*objects, device_placement=device_placement)
        result = list(out) if isinstance(out, (tuple, list)) else [out]
        sched_cls = _scheduler_class()
        # DeepSpeed steps only its own schedule types; others stay Accelerate-stepped.
        result = [sched_cls.like(r) if type(r) is _scheduler_base() else r for r in result]
        return result[0] if len(result) == 1 else tuple(result)

    if zero_stage is not None:
        if kind == "FSDP":
            raise ValueError("prepare: zero_stage and an FSDP plugin exclude each other (FSDP shards already)")
        dist_opts = [o for o in optimizers if _is_distopt_optimizer(o)]
        if len(models) != 1 or len(dist_opts) != 1:
            raise ValueError(
                f"prepare(zero_stage={zero_stage}) needs exactly one model and one distopt "
                f"optimizer among the objects, got {len(models)} model(s) and "
                f"{len(dist_opts)} distopt optimizer(s)"
            )
        import distopt

        model, opt = models[0], dist_opts[0]
        model_ids = {id(p) for p in model.parameters()}
        if not _param_ids(opt) <= model_ids:
            raise ValueError("prepare: the distopt optimizer holds parameters that are not the model's")
        if accelerator.device_placement:
            model.to(accelerator.device)
        import torch.distributed as dist

        if not dist.is_initialized() and accelerator.num_processes == 1:
            # One process without a launcher: distopt ZeRO over a world of one.
            backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        sharded, opt = distopt.shard(model, opt, stage=zero_stage, bucket_mb=bucket_mb, master_dtype=master_dtype)
        # Registered (autocast, accumulate/no_sync) but not wrapped in DDP, and not moved again:
        # the ZeRO shards are views into the parameters' storage, which a later ``.to()`` (even
        # "cpu" -> "cpu:0") would replace.
        sharded = mark_prepared(accelerator.prepare_model(sharded, device_placement=False, evaluation_mode=True))
        objects[objects.index(models[0])] = sharded
        models = [sharded]

    # distopt optimizers are wrapped here, as Accelerate would, in the subclass that saves
    # through distopt.checkpoint; ``prepare`` then registers them as they are
    opt_cls, sched_cls = _optimizer_class(), _scheduler_class()
    for i, o in enumerate(objects):
        if isinstance(o, torch.optim.Optimizer) and _is_distopt_optimizer(o):
            place = accelerator.device_placement if device_placement is None else device_placement[i]
            objects[i] = mark_prepared(opt_cls(o, device_placement=place, scaler=accelerator.scaler))
    out = accelerator.prepare(*objects, device_placement=device_placement)
    result = list(out) if isinstance(out, (tuple, list)) else [out]

    reg = _registry(accelerator)
    reg.prune()
    prepared_models = [r for r in result if isinstance(r, nn.Module)]
    for r in result:
        inner = _inner_optimizer(r)
        if r is not inner and _is_distopt_optimizer(inner):
            ids = _param_ids(inner)
            owner = None
            for m in prepared_models:  # the model whose tensors (its ZeRO shards, if sharded) these are
                if ids and ids <= {id(e.opt_tensor) for e in backend_for(m).entries(inner)}:
                    owner = m
                    break
            if owner is None:
                raise ValueError(
                    "prepare: pass the model together with its distopt optimizer, so that "
                    "accelerator.save_state can save them through distopt.checkpoint"
                )
            reg.pairs.append(_Pair(owner, r, inner))
    base_sched = _scheduler_base()
    for i, r in enumerate(result):
        if isinstance(r, base_sched):
            r = result[i] = sched_cls.like(r)
            for pair in reg.pairs:
                if any(o is pair.accelerated for o in r.optimizers) and pair.scheduler is None:
                    pair.scheduler = r.scheduler
    return result[0] if len(result) == 1 else tuple(result)


# --------------------------------------------------------------------------- accumulation


class GradientAccumulator:
    """:class:`distopt.GradientAccumulator` that keeps Accelerate on the same boundaries.

    ::

        acc = GradientAccumulator(accelerator, model)          # steps: the accelerator's
        for batch in loader:
            with acc.accumulate(num_items=n_tokens(batch)):
                acc.backward(model(batch))                       # SUM over the batch's tokens
            optimizer.step(); scheduler.step(); optimizer.zero_grad()   # no-ops off-boundary
        if acc.flush():
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

    Inside each block Accelerate's ``sync_gradients`` is set to distopt's boundary, so the
    prepared optimizer steps and zeroes, and the prepared scheduler steps, exactly when distopt
    synchronised and normalised the gradients.  The accumulator's position is saved and restored
    by ``accelerator.save_state`` / ``load_state`` with its model's distopt checkpoint.

    Args:
        accelerator: the accelerator the model was prepared with (by :func:`prepare`).
        model: the prepared model.
        steps: micro-batches per optimizer step; default ``accelerator.gradient_accumulation_steps``.
            If the accelerator's count is not 1 it must equal ``steps``.
        reduce_every_micro_batch: as for :class:`distopt.GradientAccumulator`.
    """

    def __init__(self, accelerator: Any, model: nn.Module, steps: int | None = None, *,
                 reduce_every_micro_batch: bool = False) -> None:
        import distopt

        acc_steps = int(getattr(accelerator, "gradient_accumulation_steps", 1))
        if steps is None:
            steps = acc_steps
        if acc_steps != 1 and acc_steps != steps:
            raise ValueError(
                f"GradientAccumulator: steps={steps} but the Accelerator accumulates over "
                f"gradient_accumulation_steps={acc_steps}; set them equal (or leave the "
                "Accelerator's at 1) so both agree on the boundaries"
            )
        self.accelerator = accelerator
        self.inner = distopt.GradientAccumulator(model, steps, reduce_every_micro_batch=reduce_every_micro_batch)
        pair = getattr(accelerator, "_distopt_registry", None)
        pair = pair.pair_of_model(model) if pair is not None else None
        if pair is not None:
            pair.accumulator = self

    #: read from the distopt accumulator inside (see :class:`distopt.GradientAccumulator`)
    steps = property(lambda self: self.inner.steps)
    sync_gradients = property(lambda self: self.inner.sync_gradients)
    micro_step = property(lambda self: self.inner.micro_step)
    optimizer_steps = property(lambda self: self.inner.optimizer_steps)

    def _set_sync(self, value: bool) -> None:
        set_sync_gradients(self.accelerator, value)

    @contextmanager
    def accumulate(self, num_items: int | float | Tensor | None = None) -> Iterator[None]:
        """distopt's ``accumulate`` block, with Accelerate's ``sync_gradients`` set to match."""
        self._set_sync(self.inner.micro_step + 1 == self.inner.steps)
        with self.inner.accumulate(num_items):
            yield
        self._set_sync(self.inner.sync_gradients)

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """Backpropagate ``loss`` (through Accelerate's gradient scaler when there is one)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            loss = scaler.scale(loss)
        self.inner.backward(loss, **kwargs)

    def flush(self) -> bool:
        """Close a window that ends early; True (and ``sync_gradients``) if there is a step."""
        stepped = self.inner.flush()
        self._set_sync(stepped)
        return stepped

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
