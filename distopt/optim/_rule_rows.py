"""Rules with per-channel statistics: a channel-sums pass and an update with per-channel factors.

:func:`distopt.optim._kernel.apply` runs element-wise rules over flattened tensors and
delivers whole-tensor sums (``sums=``).  The AdamP/SGDP projection needs statistics per
*channel* (dim-0 row) and applies one coefficient per channel, which a flat kernel cannot
express.  This module runs the same kind of rule over each parameter viewed as
``(rows, cols)``:

* :func:`row_sums`: ``rule(..., phase="rows")`` returns per-element values; each is summed
  over every row (one read of the parameter, gradient and states, one compiled reduction
  kernel per rule);
* :func:`update_rows`: ``rule(p * factor, g, st, s)`` with one ``factor`` per row (a
  ``(rows, 1)`` tensor, broadcast inside the kernel), the results written in place as
  :func:`~distopt.optim._kernel.apply` does: one read and one write of each tensor.

Both compile with ``torch.compile(dynamic=True, fullgraph=True)`` under the same mode switch
as :mod:`distopt.optim._kernel` (``DISTOPT_KERNELS``), fall back to the same function run
eagerly (in row chunks) where compiling is not possible or fails, and honour
``torch.amp.GradScaler`` the same way: the gradient is multiplied by ``1 / grad_scale`` inside
the kernel, every output keeps its old value where ``found_inf`` is set (``torch.where``, no
host read) and :func:`update_rows` takes the step back from each ``step`` counter.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _kernel as K
from distopt.optim._core import ParamView
from distopt.optim._functional import device_tensor

__all__ = ["row_sums", "update_rows", "local_rows"]

log = logging.getLogger(__name__)

_kernels: dict[Any, Callable[..., Any]] = {}
_failed: set[Any] = set()


def local_rows(view: ParamView) -> int:
    """Rows of ``view``'s local values (its dim-0 slice; 1 for a 0-dim local tensor)."""
    return view.data.shape[0] if view.data.dim() > 0 else 1


def _factory(key: tuple, phase: str) -> Callable[..., Any]:
    rule, states, names, options, sums = key
    opts = dict(options)

    def kernel(
        p: Tensor,
        g: Tensor,
        sts: tuple[Tensor, ...],
        sc: Tensor,
        factor: Tensor | None,
        inv: Tensor | None,
        found_inf: Tensor | None,
    ) -> Any:
        if inv is not None:
            g = g * inv
        s = dict(zip(names, sc.unbind(0)))
        old = dict(zip(states, sts))
        if phase == "rows":
            parts = rule(p, g, old, s, phase="rows", **opts)
            return torch.stack([parts[k].sum(dim=1, dtype=torch.float32) for k in sums])
        new_p, new = rule(p * factor, g, old, s, **opts)
        for dst, val in [(p, new_p)] + [(old[k], v) for k, v in new.items()]:
            if found_inf is not None:
                val = torch.where(found_inf > 0, dst, val)
            dst.copy_(val)
        return None

    # one code object per (rule, phase): torch.compile's caches and recompile limit are per code
    # object, so rules never evict each other's kernels
    code = kernel.__code__.replace(co_name=f"distopt_{rule.__name__}_{phase}_rows")
    return types.FunctionType(
        code, kernel.__globals__, code.co_name, kernel.__defaults__, kernel.__closure__
    )


def _kernel(key: tuple, phase: str, compiled: bool) -> Callable[..., Any]:
    fn = _kernels.get((key, phase, compiled))
    if fn is None:
        fn = _factory(key, phase)
        if compiled:  # the backend and options of _kernel's kernels
            backend = getattr(K, "BACKEND", "inductor")
            options = getattr(K, "COMPILE_OPTIONS", None) if backend == "inductor" else None
            fn = torch.compile(fn, dynamic=True, fullgraph=True, backend=backend, options=options)
        _kernels[(key, phase, compiled)] = fn
    return fn


def _as_rows(t: Tensor, rows: int, cols: int, copies: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``t`` as (rows, cols), sharing its memory; detached so that ``torch.compile`` does not
    guard on the base's rank (a view of a 4-d weight would otherwise compile the kernel again).
    A layout no view can express (a permuted, non-contiguous >2-d tensor) is copied; the copy
    is written back after the update (``copies``)."""
    try:
        return t.view(rows, cols).detach()
    except RuntimeError:
        c = t.reshape(rows, cols).contiguous()
        copies.append((t, c))
        return c


def _run(
    opt: Any,
    phase: str,
    rule: Callable[..., Any],
    views: Sequence[ParamView],
    states: Sequence[str],
    scalars: Sequence[Mapping[str, float]],
    factors: Sequence[Tensor | None],
    sums: tuple[str, ...],
    options: dict[str, Any],
) -> list[Any]:
    if len(scalars) != len(views) or len(factors) != len(views):
        raise ValueError(
            f"_rule_rows: {len(views)} views need as many scalar sets ({len(scalars)}) and "
            f"factors ({len(factors)})"
        )
    if not views:
        return []
    grad_scale, found_inf = K.scaler_of(opt)
    names = tuple(scalars[0])
    key = (rule, tuple(states), names, tuple(sorted(options.items())), sums)
    packs: dict[tuple, Tensor] = {}
    aux: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}
    out = []
    for v, vals, factor in zip(views, scalars, factors):
        dev = v.data.device
        values = tuple(float(vals[n]) for n in names)
        sc = packs.get((values, dev))
        if sc is None:
            sc = packs[(values, dev)] = device_tensor(values, torch.float64, dev)  # no sync
        if dev not in aux:
            inv = None if grad_scale is None else grad_scale.to(dev, torch.float32).reciprocal()
            fi = None if found_inf is None or phase == "rows" else found_inf.to(dev, torch.float32)
            aux[dev] = (inv, fi)
        rows, cols = local_rows(v), math.prod(v.shape[1:])
        copies: list[tuple[Tensor, Tensor]] = []
        args = [
            _as_rows(v.data, rows, cols, copies),
            _as_rows(v.grad, rows, cols, []),
            tuple(_as_rows(v.state[n], rows, cols, copies) for n in states),
            sc,
            None if factor is None else factor.reshape(rows, 1).to(v.data.dtype),
            *aux[dev],
        ]
        out.append(_call(key, phase, rows, cols, len(sums), dev, args))
        if phase == "update":
            for t, c in copies:
                t.copy_(c.view(t.shape))
    return out


def _call(
    key: tuple, phase: str, rows: int, cols: int, k: int, dev: torch.device, args: list
) -> Any:
    if K.mode() == "compile" and key not in _failed and rows > 0 and K._can_compile(dev):
        try:
            return _kernel(key, phase, True)(*args)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the same maths eagerly
            _failed.add(key)
            log.warning(
                "distopt: compiling the %s %s kernel failed (%s: %s); running it eagerly "
                "(set %s=eager to skip compiling)",
                key[0].__name__, phase, type(exc).__name__, exc, K.ENV,
            )  # fmt: skip
    return _eager(_kernel(key, phase, False), phase, rows, cols, k, *args)


def _eager(fn: Callable[..., Any], phase: str, rows: int, cols: int, k: int, *args: Any) -> Any:
    """``fn`` over chunks of rows (cache-sized temporaries instead of tensor-sized ones)."""
    p, g, sts, sc, factor, inv, fi = args
    step = max(1, K.EAGER_CHUNK // max(cols, 1))
    res = []
    for a in range(0, rows, step):
        b = min(rows, a + step)
        f = None if factor is None else factor[a:b]
        res.append(fn(p[a:b], g[a:b], tuple(t[a:b] for t in sts), sc, f, inv, fi))
    if phase != "rows":
        return None
    return torch.cat(res, dim=1) if res else p.new_zeros(k, 0, dtype=torch.float32)


def row_sums(
    opt: Any,
    rule: Callable[..., Any],
    views: Sequence[ParamView],
    states: Sequence[str],
    scalars: Sequence[Mapping[str, float]],
    sums: Sequence[str],
    **options: Any,
) -> list[Tensor]:
    """Per local row of each view, the sums of ``rule(p, g, st, s, phase="rows", **options)``'s
    values named ``sums``: one ``(len(sums), local rows)`` float32 tensor per view.

    ``scalars``: one mapping of host floats per view (the rule's ``s``); ``opt``: the optimizer
    (``GradScaler``'s ``grad_scale`` divides the gradient, as in the update).
    """
    nones = [None] * len(views)
    return _run(opt, "rows", rule, views, states, scalars, nones, tuple(sums), options)


def update_rows(
    opt: Any,
    rule: Callable[..., Any],
    views: Sequence[ParamView],
    states: Sequence[str],
    scalars: Sequence[Mapping[str, float]],
    factors: Sequence[Tensor],
    **options: Any,
) -> None:
    """``p, st <- rule(p * factor, g, st, s, **options)`` in place for each view, ``factors[i]``
    one value per local row of ``views[i]`` (device tensors: decisions need no host read).

    Call once per param group and step: a step ``GradScaler`` skips is taken back here.
    """
    _run(opt, "update", rule, views, states, scalars, factors, (), options)
    _, found_inf = K.scaler_of(opt)
    if found_inf is not None:
        for v in views:
            step = v.state.get("step")
            if isinstance(step, Tensor):
                step.sub_(found_inf.to(step.device, step.dtype))
