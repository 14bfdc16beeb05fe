"""The one table that drives the optimizer tests (and, later, the sharding and resume tests).

Each :class:`OptimCase` names a distopt optimizer configuration, an independent reference of
its published update rule (``tests/references.py`` and friends), optionally the peer library's
implementation at the same settings, and what the convergence checks need.  Cases are grouped
by family in ``tests/cases/*.py``; this module collects them into ``CASES``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MakeFn = Callable[[Any], torch.optim.Optimizer]


@dataclass
class OptimCase:
    id: str
    make: MakeFn  # params -> distopt optimizer
    reference: MakeFn | None = None  # params -> independent reference optimizer
    peer: Callable[[Any], torch.optim.Optimizer | None] | None = None  # timm/transformers; None if absent
    rosen_lr: float = 1e-2  # lr that makes Rosenbrock converge within ``rosen_steps``
    rosen_steps: int = 1500
    rosen_tol: float = 0.5  # final Rosenbrock loss must be below this (start: 1.0 at (-1, 1)... see tests)
    model_lr: float = 1e-2
    tol: float = 1e-5  # rtol/atol against reference and peer
    steps: int = 10
    create_graph: bool = False  # needs backward(create_graph=True) (Adahessian)
    shape_aware: bool = False  # uses the reducer (per-tensor norms, factored statistics, ...)
    family: str = ""
    extra: dict = field(default_factory=dict)


def _collect() -> list[OptimCase]:
    import tests.cases as pkg

    cases: list[OptimCase] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"tests.cases.{info.name}")
        cases.extend(getattr(mod, "CASES", []))
    ids = [c.id for c in cases]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise RuntimeError(f"duplicate optimizer case ids: {sorted(dupes)}")
    return cases


CASES: list[OptimCase] = _collect()


def _class_key(case: OptimCase) -> str:
    import torch

    opt = case.make([torch.nn.Parameter(torch.zeros(2))])
    base = getattr(opt, "base_optimizer", None) or getattr(opt, "_base_optimizer", None)
    return type(opt).__name__ + (f"({type(base).__name__})" if base is not None else "")


def sharding_cases() -> list[OptimCase]:
    """The cases the multi-process sharding tests run: every shape-aware case (their maths
    changes under sharding) and the first case of every other optimizer class (element-wise
    maths never looks across rows; the in-process simulator in test_shard_maths.py covers
    every case at 2-4 simulated ranks).  A case with ``extra["multiprocess"] = False`` runs
    here only as the first case of its class."""
    seen: set[str] = set()
    out = []
    for c in CASES:
        if c.create_graph:
            continue
        key = _class_key(c)
        if c.extra.get("multiprocess") is False and key in seen:
            continue  # a variant whose only reduction the simulator already proves (CI budget)
        if c.shape_aware or key not in seen:
            out.append(c)
        seen.add(key)
    return out
