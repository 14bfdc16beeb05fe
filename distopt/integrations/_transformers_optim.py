"""The optimizer and schedule of :class:`DistoptTrainer`, named from ``TrainingArguments``.

``DistoptTrainer(optim=...)`` names any distopt optimizer; without it, ``args.optim`` is mapped to
distopt with the Trainer's defaults (:func:`trainer_optimizer_names`), and ``args.optim_args``
is read by :func:`parse_optim_args`.  The schedule is :func:`distopt.schedules.get_scheduler` of
``schedule=`` or ``args.lr_scheduler_type``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from distopt.integrations.transformers import DistoptTrainerConfig

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "inner_optimizer",
    "is_distopt_optimizer",
    "parse_optim_args",
    "trainer_optimizer_names",
]


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
        # transformers' schedule-free names (its own defaults: the Trainer's Adam betas/eps for
        # AdamW and RAdam, its warmup steps for AdamW and SGD; r, weight_lr_power from optim_args)
        "schedule_free_adamw": (dopt.AdamWScheduleFree, {**adam, "warmup_steps": _warmup}),
        "schedule_free_sgd": (dopt.SGDScheduleFree, {"warmup_steps": _warmup}),
        "schedule_free_radam": (dopt.RAdamScheduleFree, adam),
    }
    if name not in table:
        return None
    cls, kw = table[name]
    return cls, {k: (v(args) if callable(v) else v) for k, v in kw.items()}


def _warmup(args: Any) -> int:
    """``args.warmup_steps`` as a step count for a schedule-free optimizer's own warmup.

    transformers takes a value below 1 as a fraction of the training steps; the optimizer is
    built before the Trainer knows them unless ``max_steps`` is given.
    """
    w = float(args.warmup_steps)
    if w >= 1 or w == 0:
        return int(w)
    if args.max_steps and args.max_steps > 0:
        return math.ceil(args.max_steps * w)
    raise ValueError(
        f"DistoptTrainer: warmup_steps={w} is a fraction of the training steps, which the "
        "schedule-free optimizer's own warmup needs as a count: give warmup_steps as a number "
        "of steps (>= 1), or set max_steps"
    )


def trainer_optimizer_names() -> list[str]:
    """The ``TrainingArguments.optim`` values :class:`DistoptTrainer` maps to distopt."""
    return [
        "adafactor",
        "adagrad",
        "adamw_torch",
        "adamw_torch_fused",
        "rmsprop",
        "schedule_free_adamw",
        "schedule_free_radam",
        "schedule_free_sgd",
        "sgd",
    ]


def is_distopt_optimizer(opt: Any) -> bool:
    """Whether ``opt`` is a distopt optimizer (Lookahead included)."""
    from distopt.optim._core import DistOptimizer
    from distopt.optim.lookahead import Lookahead

    return isinstance(opt, (DistOptimizer, Lookahead))


def inner_optimizer(opt: Any) -> Any:
    """The optimizer inside Accelerate's ``AcceleratedOptimizer`` (or ``opt`` itself)."""
    return getattr(opt, "optimizer", opt) if type(opt).__name__ == "AcceleratedOptimizer" else opt


def build_optimizer(
    cfg: DistoptTrainerConfig, args: Any, model: nn.Module, decay: Iterable[str]
) -> torch.optim.Optimizer:
    """The distopt optimizer for ``model``: the Trainer's two param groups, ``args.learning_rate``.

    ``decay`` names the parameters that get ``args.weight_decay`` (the Trainer's
    ``get_decay_parameter_names``); the others get none.
    """
    import distopt.optim as dopt

    decay_names = set(decay)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay_names], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
    ]
    # both groups even when one is empty, as the Trainer builds them: a Trainer optimizer.pt
    # then imports position by position
    if cfg.optim is not None:
        base = cfg.optim[len("lookahead_") :] if cfg.optim.startswith("lookahead_") else cfg.optim
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
        kwargs = cfg.optim_kwargs if cfg.optim_kwargs else parse_optim_args(args.optim_args)
        return dopt.create_optimizer_v2(
            groups,
            opt=cfg.optim,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            **kwargs,
        )
    mapped = _trainer_optim(args)
    if mapped is None:
        raise ValueError(
            f"DistoptTrainer: TrainingArguments.optim={getattr(args.optim, 'value', args.optim)!r} "
            f"has no distopt equivalent; use one of {', '.join(trainer_optimizer_names())}, or "
            "name any distopt optimizer with DistoptTrainer(optim=...) (distopt.optim.list_optimizers())"
        )
    cls, kwargs = mapped
    kwargs.update(cfg.optim_kwargs if cfg.optim_kwargs else parse_optim_args(args.optim_args))
    return cls(groups, lr=args.learning_rate, **kwargs)


def build_scheduler(
    cfg: DistoptTrainerConfig,
    args: Any,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The distopt schedule named by ``cfg.schedule`` or ``args.lr_scheduler_type``."""
    from distopt.schedules import get_scheduler

    name = cfg.schedule if cfg.schedule is not None else args.lr_scheduler_type
    kwargs = cfg.schedule_kwargs if cfg.schedule_kwargs is not None else args.lr_scheduler_kwargs
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs or None,
    )
