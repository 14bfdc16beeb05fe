"""Bytes an optimizer step must move, and the bandwidth a measured step achieved.

An optimizer step is memory-bound: its least cost is one read of every input and one write of
every output its maths needs.  Per parameter element that is the parameter (read and written),
the gradient (read) and every parameter-sized state tensor (read, and written unless it is
read-only, e.g. MADGRAD's ``x0``).  Optimizers with whole-tensor statistics (norms, trust
ratios, cautious masks, factored moments) need one more read of the parameter, the gradient
and the state before the update (a statistics pass); an optimizer whose statistics read less
says which tensors through ``statistics_reads(group)`` (``"param"``, ``"grad"`` and state names;
MARS: the gradient and ``last_grad``).  Counted from the state the optimizer actually holds
after its first step, so the figure is the same for distopt and its peers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["step_bytes", "traffic", "whole_tensor_stats", "statistics_reads"]

#: state tensors every known optimizer reads but never writes during an update: MADGRAD's
#: ``x0``; Adahessian's kept Hessian estimate ``hess`` (``update_each > 1``), written only by the
#: Hessian-vector products of its Hessian steps, which ``bench step`` does not time
READ_ONLY_STATE = frozenset({"x0", "hess"})


def _base(opt: Any) -> Any:
    """The optimizer whose state and maths a step runs (Lookahead's wrapped one, else ``opt``)."""
    base = getattr(opt, "base_optimizer", None)
    return base if base is not None else opt


def _state_of(opt: Any) -> dict:
    return getattr(_base(opt), "state", {})


def whole_tensor_stats(opt: Any) -> bool:
    """Whether a step of ``opt`` (or of the optimizer it wraps) needs whole-tensor statistics."""
    base = _base(opt)
    fn = getattr(base, "needs_whole_tensors", None)
    if fn is None:
        return False
    return any(fn(g) for g in base.param_groups)


def statistics_reads(opt: Any) -> frozenset[str] | None:
    """What the statistics pass of ``opt`` (or of the optimizer it wraps) reads, for its first
    param group; ``None``: everything the update reads."""
    base = _base(opt)
    fn = getattr(base, "statistics_reads", None)
    groups = getattr(base, "param_groups", None)
    return fn(groups[0]) if fn is not None and groups else None


def step_bytes(
    opt: Any,
    params: Sequence[torch.Tensor],
    stats: bool | None = None,
    reads: frozenset[str] | None = None,
) -> float:
    """Least bytes moved per parameter element by one step of ``opt`` (see the module docstring).

    ``stats``: whether the maths needs a statistics pass (default: the optimizer says, through
    ``needs_whole_tensors``); ``reads``: what that pass reads (default: the optimizer says,
    through ``statistics_reads``).  A peer library's optimizer is told both by its distopt
    twin's answers.
    """
    state = _state_of(opt)
    total = 0.0
    count = 0
    stats = whole_tensor_stats(opt) if stats is None else stats
    stats_reads = reads if reads is not None else statistics_reads(opt)
    for p in params:
        n = p.numel()
        size = p.element_size()
        reads, writes = 2, 1  # read p and g, write p
        names = ["param", "grad"]
        for name, value in state.get(p, {}).items():
            if not isinstance(value, torch.Tensor) or value.numel() != n or n <= 1:
                continue
            reads += 1
            writes += 0 if name in READ_ONLY_STATE else 1
            names.append(name)
        if stats:
            reads += reads if stats_reads is None else sum(k in stats_reads for k in names)
        total += n * size * (reads + writes)
        count += n
    return total / max(count, 1)


def traffic(
    opt: Any,
    params: Sequence[torch.Tensor],
    seconds: float,
    stats: bool | None = None,
    reads: frozenset[str] | None = None,
) -> dict[str, float]:
    """``{"bytes_per_param", "gbps"}`` of a step of ``opt`` over ``params`` that took ``seconds``."""
    per = step_bytes(opt, params, stats, reads)
    numel = sum(p.numel() for p in params)
    return {
        "bytes_per_param": per,
        "gbps": per * numel / seconds / 1e9 if seconds > 0 else float("nan"),
    }
