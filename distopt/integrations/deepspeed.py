"""DeepSpeed with distopt optimizers and schedules.

::

    from distopt.integrations.deepspeed import initialize

    optimizer = distopt.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    scheduler = distopt.schedules.get_cosine_schedule_with_warmup(optimizer, 100, 10_000)
    engine, optimizer, _, scheduler = initialize(model, optimizer, scheduler,
                                                 config="launch/deepspeed/zero2.json")
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()          # optimizer step + one schedule step per optimizer step

What runs where:

* **Element-wise** distopt optimizers (AdamW, Adam, Nadam, RAdam, AdaBelief, MADGRAD, RMSprop,
  RMSpropTF, SGD, Adagrad, Adadelta, Adamax, AdamWeightDecay without clipping — every class with
  ``needs_whole_tensors(group) == False``) run as DeepSpeed *client optimizers* under every ZeRO
  stage: DeepSpeed hands them its flat fp32 partitions and the numbers are those of distopt's
  own ZeRO (:func:`distopt.shard`).
* **Shape-aware** ones (Lamb, Lars, NvNovoGrad, AdamP, SGDP, Adafactor, RMSpropTF with
  ``caution``, AdamWeightDecay with ``clipnorm``/``global_clipnorm``, Adahessian) need whole
  parameters, which DeepSpeed's flat partitions (ZeRO, and its fp16/bf16 wrappers) cut apart.
  :func:`initialize` refuses them before DeepSpeed is touched.  An optimizer that reaches
  DeepSpeed by another road (plain ``deepspeed.initialize(optimizer=...)``, ``accelerator.prepare``
  with a DeepSpeed plugin, the HF Trainer) refuses at its first step, before any update.  The
  error names the optimizer, says why, and points to ``distopt.shard``.
* **ZeRO-Offload** (``offload_optimizer.device`` = ``cpu``/``nvme``): the distopt optimizer
  itself runs on DeepSpeed's CPU fp32 partitions — it is *not* swapped for DeepSpeed's CPUAdam.
  :func:`initialize` says so in a warning and sets ``zero_force_ds_cpu_optimizer: false`` (the
  switch DeepSpeed requires for any client optimizer under offload) unless you set it yourself.
* **Schedules**: the engine steps the ``lr_scheduler`` once per optimizer step (on accumulation
  boundaries, not on skipped fp16 steps), which is how distopt counts schedule steps.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distopt.optim._core import flat_partition_refusal

__all__ = [
    "check_optimizer",
    "initialize",
    "load_config",
    "partitions_are_flat",
    "prepare_config",
    "zero_stage",
]

log = logging.getLogger("distopt.integrations.deepspeed")


def load_config(config: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """A DeepSpeed config as a new dict: from a mapping (deep-copied) or a JSON file path."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = Path(config)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"DeepSpeed config {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc


def _enabled(section: Any) -> bool:
    if not isinstance(section, Mapping):
        return False
    value = section.get("enabled", False)
    return value is True or (isinstance(value, str) and value.lower() == "true")


def zero_stage(config: Mapping[str, Any]) -> int:
    """The ZeRO stage a config asks for (0 when absent)."""
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    try:
        return int(stage)
    except (TypeError, ValueError):
        raise ValueError(f"zero_optimization.stage must be an integer, got {stage!r}") from None


def partitions_are_flat(config: Mapping[str, Any]) -> str | None:
    """What makes DeepSpeed hand the client optimizer flat partitions, or None.

    ZeRO stages 1-3 and the fp16/bf16 wrappers flatten the parameters of each group into one
    1-D fp32 tensor (partitioned across ranks under ZeRO).
    """
    stage = zero_stage(config)
    if stage > 0:
        return f"DeepSpeed ZeRO stage {stage}"
    for key in ("fp16", "bf16", "bfloat16"):
        if _enabled(config.get(key)):
            return f"DeepSpeed {key} (flat fp32 master copies)"
    return None


def check_optimizer(optimizer: torch.optim.Optimizer, config: Mapping[str, Any] | str | os.PathLike) -> None:
    """Raise ValueError if ``optimizer`` cannot be exact under ``config``'s DeepSpeed set-up.

    A distopt optimizer whose param groups need whole tensors (see
    ``DistOptimizer.needs_whole_tensors``) is refused under ZeRO stage >= 1 and fp16/bf16.
    Other optimizers (torch.optim, ...) are not judged.
    """
    cfg = config if isinstance(config, Mapping) else load_config(config)
    where = partitions_are_flat(cfg)
    if where is None:
        return
    msg = flat_partition_refusal(optimizer, where)
    if msg is not None:
        raise ValueError(msg)


def _offload_device(cfg: Mapping[str, Any]) -> str | None:
    zero = cfg.get("zero_optimization") or {}
    off = zero.get("offload_optimizer") if isinstance(zero, Mapping) else None
    if not isinstance(off, Mapping):
        return None
    device = str(off.get("device", "none")).lower()
    return None if device in ("none", "") else device


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def prepare_config(
    optimizer: torch.optim.Optimizer,
    config: str | os.PathLike | Mapping[str, Any] | None,
    lr_scheduler: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config :func:`initialize` uses for a distopt ``optimizer``.

    Checks the optimizer (:func:`check_optimizer`); refuses a config that also defines an
    ``optimizer`` (or, with ``lr_scheduler``, a ``scheduler``) section, since DeepSpeed would have
    to pick one; allows distopt's optimizers under ZeRO (``zero_allow_untested_optimizer``:
    their element-wise maths is tested against distopt's own ZeRO); under ZeRO-Offload, keeps
    the distopt optimizer (``zero_force_ds_cpu_optimizer: false``) and warns what runs.
    """
    cfg = _merge(load_config(config), overrides or {})
    if "optimizer" in cfg:
        raise ValueError(
            f"distopt.integrations.deepspeed: the DeepSpeed config defines an 'optimizer' section "
            f"({cfg['optimizer'].get('type', '?') if isinstance(cfg['optimizer'], Mapping) else '?'}) "
            f"and a distopt optimizer ({type(optimizer).__name__}) was given; remove the section "
            "(the distopt optimizer is the client optimizer) or do not pass an optimizer"
        )
    if lr_scheduler is not None and "scheduler" in cfg:
        raise ValueError(
            "distopt.integrations.deepspeed: the DeepSpeed config defines a 'scheduler' section and "
            f"an lr_scheduler ({type(lr_scheduler).__name__}) was given; remove one of the two"
        )
    check_optimizer(optimizer, cfg)
    if zero_stage(cfg) > 0:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    device = _offload_device(cfg)
    if device is not None:
        if cfg.get("zero_force_ds_cpu_optimizer") is True:
            raise ValueError(
                f"distopt.integrations.deepspeed: offload_optimizer.device={device!r} with "
                "zero_force_ds_cpu_optimizer=true makes DeepSpeed refuse any client optimizer; "
                f"set it to false to run distopt's {type(optimizer).__name__} on the offloaded "
                "partitions, or use DeepSpeed's own optimizer (no distopt optimizer)"
            )
        cfg["zero_force_ds_cpu_optimizer"] = False
        log.warning(
            "ZeRO-Offload (offload_optimizer.device=%s): distopt's %s runs on DeepSpeed's fp32 "
            "partitions on the CPU, with its state there; it is NOT replaced by DeepSpeed's "
            "CPUAdam (zero_force_ds_cpu_optimizer set to false). Expect CPU-bound optimizer steps.",
            device,
            type(optimizer).__name__,
        )
    return cfg


def initialize(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with a distopt optimizer (and schedule) as client objects.

    Args:
        model: the plain model.
        optimizer: a distopt optimizer built on ``model``'s parameters (not yet stepped).
        lr_scheduler: a schedule built on ``optimizer`` (e.g. ``distopt.schedules.get_scheduler``);
            the engine steps it once per optimizer step.
        config: DeepSpeed config (dict or JSON path), without an ``optimizer`` section.
        config_overrides: merged into the config (nested dicts key by key), e.g.
            ``{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}``.
        **kwargs: passed to ``deepspeed.initialize`` (``training_data``, ``model_parameters``, ...).

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)`` as DeepSpeed returns them.

    Raises:
        ValueError: a shape-aware optimizer under ZeRO or fp16/bf16 (the message says why and
            points to ``distopt.shard``); a config with its own optimizer/scheduler section.
    """
    cfg = prepare_config(optimizer, config, lr_scheduler, config_overrides)
    import deepspeed

    return deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=cfg, **kwargs
    )
