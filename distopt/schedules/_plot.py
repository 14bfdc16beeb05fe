"""Evaluate a schedule by name over a run and draw it (matplotlib, Agg, imported lazily)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distopt.schedules import _functions as F
from distopt.schedules._factories import create_tf_style_schedule
from distopt.schedules._registry import SchedulerType, get_scheduler, list_schedules

__all__ = ["Curve", "schedule_curve", "plot_schedule", "PLOT_HINT"]

PLOT_HINT = "plotting schedules needs matplotlib: pip install distopt[plot]"

# Schedules whose picture has no warmup phase.
_NO_WARMUP = {"constant", "reduce_lr_on_plateau", "adafactor"}


@dataclass
class Curve:
    """A schedule evaluated at steps ``0..num_training_steps``."""

    name: str
    steps: list[int]
    lrs: list[float]
    num_warmup_steps: int
    num_training_steps: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    # (step, label) boundaries worth marking besides the end of warmup
    marks: list[tuple[int, str]] = field(default_factory=list)
    note: str = ""
    stairs: bool = False  # draw as a step function


def _dummy_optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def schedule_curve(name: str, num_training_steps: int = 100, num_warmup_steps: int | None = None,
                   lr: float = 1.0, kwargs: Mapping[str, Any] | None = None) -> Curve:
    """Evaluate schedule ``name`` (any of :func:`list_schedules`) at every step of a run.

    ``num_warmup_steps`` defaults to a tenth of the run.  Convenience defaults for the
    picture: ``warmup_stable_decay`` decays over the last fifth unless ``num_decay_steps`` is
    given; ``cosine_with_min_lr`` uses ``min_lr_rate=0.1`` unless a minimum is given;
    ``reduce_lr_on_plateau`` (``patience`` a tenth of the run, ``factor=0.5``) is fed a metric
    that never improves.
    """
    if name not in list_schedules():
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(list_schedules())}")
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) \
            or num_training_steps < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {num_training_steps}")
    t = num_training_steps
    w = t // 10 if num_warmup_steps is None else num_warmup_steps
    if name in _NO_WARMUP:
        w = 0
    kw = dict(kwargs or {})
    steps = list(range(t + 1))
    marks: list[tuple[int, str]] = []
    note = ""
    if name == "adafactor":
        bad = set(kw) - {"warmup_init", "initial_lr"}
        if bad:
            raise TypeError(f"adafactor: unexpected kwargs {sorted(bad)}; accepts initial_lr, warmup_init")
        init = float(kw.get("initial_lr", 0.0))
        warm = bool(kw.get("warmup_init", False))
        lrs = [init if s == 0 else F.adafactor_relative_step_lr(s, warm) for s in steps]
        note = "relative step size"
    elif name == "warmup":
        bad = set(kw) - {"min_lr_ratio", "power"}
        if bad:
            raise TypeError(f"warmup: unexpected kwargs {sorted(bad)}; accepts min_lr_ratio, power")
        sched = create_tf_style_schedule(_dummy_optimizer(lr), lr, t, w, **kw)
        lrs = [sched.lr_at(s) for s in steps]
    elif name == SchedulerType.REDUCE_ON_PLATEAU.value:
        kw.setdefault("patience", max(1, t // 10))
        kw.setdefault("factor", 0.5)
        opt = _dummy_optimizer(lr)
        sched = get_scheduler(name, opt, scheduler_specific_kwargs=kw)
        lrs = [float(opt.param_groups[0]["lr"])]
        for _ in range(t):
            sched.step(1.0)
            lrs.append(float(opt.param_groups[0]["lr"]))
        note = "metric never improves"
    else:
        if name == SchedulerType.WARMUP_STABLE_DECAY.value:
            if "num_decay_steps" not in kw:
                kw["num_decay_steps"] = max(1, (t - w) // 5)
            stable = kw.get("num_stable_steps", t - w - kw["num_decay_steps"])
            marks.append((w + stable, "decay"))
        if name == SchedulerType.COSINE_WITH_MIN_LR.value and "min_lr" not in kw \
                and "min_lr_rate" not in kw:
            kw["min_lr_rate"] = 0.1
        sched = get_scheduler(name, _dummy_optimizer(lr), w, t, kw)
        lrs = [sched.lr_at(s) for s in steps]
    return Curve(name=name, steps=steps, lrs=[float(x) for x in lrs], num_warmup_steps=w,
                 num_training_steps=t, kwargs=kw, marks=marks, note=note,
                 stairs=name == SchedulerType.REDUCE_ON_PLATEAU.value)


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(PLOT_HINT) from exc
    return Figure, FigureCanvasAgg


def plot_schedule(curve: Curve, path: str | Path, *, figsize: tuple[float, float] = (6, 3.5),
                  dpi: int = 80) -> Path:
    """Draw ``curve`` (lr against step, warmup shaded) into a PNG at ``path``."""
    Figure, FigureCanvasAgg = _matplotlib()
    path = Path(path)
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(curve.steps, curve.lrs, color="#1f77b4", linewidth=2,
            drawstyle="steps-post" if curve.stairs else "default")
    top = max(curve.lrs) if curve.lrs else 1.0
    top = top if top > 0 else 1.0
    w = curve.num_warmup_steps
    if w > 0:
        ax.axvspan(0, w, color="#ff7f0e", alpha=0.15, linewidth=0)
        ax.axvline(w, color="#ff7f0e", linestyle="--", linewidth=1)
        ax.text(w / 2, top * 1.04, "warmup", ha="center", va="bottom", fontsize=8,
                color="#c05000")
    for step, label in curve.marks:
        ax.axvline(step, color="gray", linestyle=":", linewidth=1)
        ax.text(step, top * 1.04, label, ha="center", va="bottom", fontsize=8, color="dimgray")
    ax.set_xlim(0, curve.num_training_steps)
    ax.set_ylim(0, top * 1.15)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    details = [f"{curve.num_training_steps} steps"]
    if w > 0:
        details.insert(0, f"warmup {w}")
    details += [f"{k}={v}" for k, v in curve.kwargs.items()]
    if curve.note:
        details.append(curve.note)
    ax.set_title(f"{curve.name}\n{', '.join(details)}", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
