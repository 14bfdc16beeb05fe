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
  :func:`~distopt.optim._kernel.apply` does: one read and one write of each tensor;
* :func:`fused_update` (unsharded tensors, compiled): both without the reduction across ranks
  in between, in one kernel per tensor: its first loop writes the states and sums the
  channels, its last reads ``p`` and the states as stored (SGDP), or, for a rule whose ``u``
  is costly to recompute (``rule.u_once``: AdamP), ``p`` and ``u`` (written by the first loop
  to a buffer of the call; tensors over ``ONCE_MAX`` elements: the same in two kernels,
  ``store`` and ``finish``, with a kept buffer for ``u``).

All compile with ``torch.compile(dynamic=True, fullgraph=True)`` (through
:func:`distopt.optim._kernel.compiled_kernel`: repeated calls skip dynamo) under the same mode
switch as :mod:`distopt.optim._kernel` (``DISTOPT_KERNELS``), fall back to the same function run
eagerly (in row chunks) where compiling is not possible or fails, and honour
``torch.amp.GradScaler`` the same way: the gradient is multiplied by ``1 / grad_scale`` inside
the kernel, every output keeps its old value where ``found_inf`` is set (``torch.where``, no
host read) and :func:`update_rows` takes the step back from each ``step`` counter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _kernel as K
from distopt.optim._core import ParamView
from distopt.optim._functional import device_tensor
from distopt.optim._kernel_compile import private
from distopt.optim._kernel_plan import alias_pair, kept_aliases, kept_grad

__all__ = ["row_sums", "update_rows", "fused_update", "fusable", "local_rows"]

log = logging.getLogger(__name__)

_kernels: dict[Any, Callable[..., Any]] = {}
_failed: set[Any] = set()


def local_rows(view: ParamView) -> int:
    """Rows of ``view``'s local values (its dim-0 slice; 1 for a 0-dim local tensor)."""
    return view.data.shape[0] if view.data.dim() > 0 else 1


def _factory(key: tuple, phase: str) -> Callable[..., Any]:
    if phase == "once":
        return _once_factory(key)
    if phase in ("store", "finish"):
        return _fused_factory(key, phase)
    rule, states, names, options, sums = key[:5]
    decide = key[5] if len(key) > 5 else None
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
        if phase != "update":
            parts = rule(p, g, old, s, phase="rows", **opts)[0]
            stats = torch.stack([parts[k].sum(dim=1, dtype=torch.float32) for k in sums])
            if phase == "rows":
                return stats
            factor = decide(stats, s).to(p.dtype).unsqueeze(1)  # phase "fused"
        new_p, new = rule(p * factor, g, old, s, **opts)
        K._store([(p, new_p)] + [(old[k], v) for k, v in new.items()], found_inf)
        # "fused": the factors are an output, so inductor stores them once per row instead of
        # computing them again (float64 square roots and divisions) for every element
        return factor if phase == "fused" else None

    # one code object per (rule, phase): torch.compile's caches and recompile limit are per code
    # object, so rules never evict each other's kernels
    return K._named(kernel, f"distopt_{rule.__name__}_{phase}_rows")


def _once_factory(key: tuple) -> Callable[..., Any]:
    """:func:`fused_update`'s kernel: ``rule(..., phase="rows")`` gives the channel products,
    ``u`` and the new states; the states are stored in place and the channel sums give
    ``factor = decide(sums, s)`` per row, then ``p <- rule(p * factor, g, given,
    phase="apply")``, ``given`` being ``{"u": u}`` for a rule with ``u_once`` (AdamP: a square
    root and a division per element), else the new states as stored (SGDP: ``u`` is the
    momentum buffer, or a sum with the gradient).

    Inductor makes two loops over the tensor.  The first (over rows, then columns) reads ``p``,
    ``g`` and the states, writes the states (and, ``u_once``, ``u`` to a buffer of the call)
    and sums the channels.  The last reads ``p`` and ``u`` (``u_once``), or ``p`` and the
    stored states (and ``g`` where ``u`` needs it: Nesterov), and writes ``p``.  One call per
    tensor (each costs ~0.1-0.2 ms of host work after a loop that streamed megabytes), no
    second read of the gradient and the old states.  Every state store is multiplied by
    ``one`` (exact ones, one per row): the stores then iterate like the row sums, and inductor
    writes them in the sums' loop (without it the flat stores take a loop of their own, which
    reads the tensors again)."""

    u_once = getattr(key[0], "u_once", False)

    def kernel(
        p: Tensor,
        g: Tensor,
        sts: tuple[Tensor, ...],
        sc: Tensor,
        one: Tensor,
        inv: Tensor | None,
        found_inf: Tensor | None,
    ) -> Tensor:
        s, g, u, stats = _rows_store(key, p, g, sts, sc, one, inv, found_inf)
        given = {"u": u} if u_once else dict(zip(key[1], sts))  # the states as just stored
        return _rows_finish(key, p, g, given, stats, s, found_inf)

    return K._named(kernel, f"distopt_{key[0].__name__}_once_rows")


def _rows_store(
    key: tuple,
    p: Tensor,
    g: Tensor,
    sts: tuple[Tensor, ...],
    sc: Tensor,
    one: Tensor,
    inv: Tensor | None,
    found_inf: Tensor | None,
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """The first half of the per-channel kernels (``once`` and ``store``): ``rule(...,
    phase="rows")``, the new states stored in place (times ``one``, see
    :func:`_once_factory`), and the channel sums.  Returns the scalars, the gradient (times
    ``inv``), ``u`` and the sums."""
    rule, states, names, options, sums = key[:5]
    if inv is not None:
        g = g * inv
    s = dict(zip(names, sc.unbind(0)))
    old = dict(zip(states, sts))
    parts, u, new = rule(p, g, old, s, phase="rows", **dict(options))
    if getattr(rule, "u_once", False):  # u's buffer feeds the last loop, not the states
        K._store([(old[k], v * one) for k, v in new.items()], found_inf)
    else:
        # ONE in-place foreach copy: the last loop's reads of ``sts`` read the state tensors.
        # With a ``copy_`` per state the new values stay in per-call buffers, which the last
        # loop reads and copies into the states; with this copy for a ``u_once`` rule inductor
        # gives m' and v' such buffers and computes u again (AdamP: checked)
        K._store_foreach([(t, new[k] * one) for t, k in zip(sts, states)], found_inf)
    stats = torch.stack([parts[k].sum(dim=1, dtype=torch.float32) for k in sums])
    return s, g, u, stats


def _rows_finish(
    key: tuple,
    p: Tensor,
    g: Tensor | None,
    given: dict[str, Tensor],
    stats: Tensor,
    s: dict[str, Tensor],
    found_inf: Tensor | None,
) -> Tensor:
    """The second half (``once`` and ``finish``): ``factor = decide(stats, s)`` per row, then
    ``p <- rule(p * factor, g, given, phase="apply")`` (``given``: ``{"u": u}`` for a
    ``u_once`` rule, else the new states).  Returns the factors: as an output, inductor stores
    them once per row instead of computing them again (float64 square roots and divisions) for
    every element."""
    rule, options, decide = key[0], key[3], key[5]
    factor = decide(stats, s).to(p.dtype).unsqueeze(1)
    new_p = rule(p * factor, g, given, s, phase="apply", **dict(options))
    K._store([(p, new_p)], found_inf)
    return factor


def _fused_factory(key: tuple, phase: str) -> Callable[..., Any]:
    """The two kernels of :func:`fused_update`.

    ``store``: ``rule(..., phase="rows")`` gives the channel products, ``u`` and the new
    states; the states are stored in place, ``u`` into ``u_out``, and the channel sums are
    returned.  Every store is multiplied by ``one`` (exact ones, one per row): the stores then
    iterate like the row sums, and inductor writes them in the sums' loop (without it the flat
    stores take a loop of their own, which reads the tensors again).
    ``finish``: ``factor = decide(sums, s)`` per row, then ``p <- rule(p * factor, ...,
    {"u": u}, phase="apply")``.  Reads ``p`` and ``u`` only: no second read of the gradient
    and states, and ``u`` (a square root and a division per element for AdamP) is not
    computed twice."""
    names = key[2]

    def store(
        p: Tensor,
        g: Tensor,
        sts: tuple[Tensor, ...],
        sc: Tensor,
        one: Tensor,
        inv: Tensor | None,
        found_inf: Tensor | None,
        u_out: Tensor,
    ) -> Tensor:
        _, _, u, stats = _rows_store(key, p, g, sts, sc, one, inv, found_inf)
        u_out.copy_(u * one)
        return stats

    def finish(p: Tensor, u: Tensor, stats: Tensor, sc: Tensor, found_inf: Tensor | None) -> Tensor:
        s = dict(zip(names, sc.unbind(0)))
        return _rows_finish(key, p, None, {"u": u}, stats, s, found_inf)

    fn = store if phase == "store" else finish
    return K._named(fn, f"distopt_{key[0].__name__}_{phase}_rows")


def _kernel(key: tuple, phase: str, compiled: bool) -> Callable[..., Any]:
    fn = _kernels.get((key, phase, compiled))
    if fn is None:
        fn = _factory(key, phase)
        if compiled:  # _kernel's backend and options; repeated calls skip dynamo
            fn = K.compiled_kernel(fn)
        _kernels[(key, phase, compiled)] = fn
    return fn


#: (id(parameter), state names, rows) -> an entry of :func:`_kernel_plan.kept_aliases`: the
#: ``(rows, cols)`` aliases of a view's values and states that :func:`fused_update` passes
#: its kernels, kept across steps (a view and a detach per tensor and step saved)
_row_aliases: dict[tuple, tuple] = {}


def _rows_pair(data: Tensor, ts: tuple[Tensor, ...], rows: int) -> tuple | None:
    """``(data, states)`` as ``(rows, cols)`` aliases (detached, see :func:`_as_rows`), or
    ``None`` where one of them is not contiguous or not shaped like ``data``."""
    cols = data.numel() // rows
    return alias_pair(data, ts, lambda t: t.view(rows, cols).detach())


#: id(gradient) -> its kept ``(rows, cols)`` alias (:func:`_kernel_plan.kept_grad` entries)
_grads: dict[int, tuple] = {}


def _grad_rows(g: Tensor, rows: int, cols: int) -> Tensor:
    """The gradient as ``(rows, cols)`` (see :func:`_as_rows`); for a contiguous one the alias
    is kept while ``g`` is the same tensor at the same address, shape and dtype (a gradient
    accumulated in place stays one tensor across steps)."""
    if not g.is_contiguous():
        return _as_rows(g, rows, cols, [])
    return kept_grad(_grads, g, lambda t: t.view(rows, cols).detach(), rows)


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
        _take_back(views, found_inf)


def fusable(views: Sequence[ParamView]) -> bool:
    """Whether :func:`fused_update` can run ``views``: compiled kernels are on and no view is
    sharded (the decision needs no sum across ranks)."""
    if not views or K.mode() != "compile" or any(v.sharded for v in views):
        return False
    return K._can_compile(views[0].data.device)


def fused_update(
    opt: Any,
    rule: Callable[..., Any],
    views: Sequence[ParamView],
    states: Sequence[str],
    scalars: Sequence[Mapping[str, float]],
    decide: Callable[[Tensor, dict[str, Tensor]], Tensor],
    sums: Sequence[str],
    *,
    layout: Sequence[int | None] | None = None,
    **options: Any,
) -> list[int]:
    """:func:`row_sums`, the per-row factors and :func:`update_rows` of each unsharded view,
    compiled, with no reduction in between: ``factor = decide(channel sums, s)`` (``(rows,)``,
    from the sums of ``rule(..., phase="rows")``'s values named ``sums``), then ``rule(p *
    factor, g, st, s)`` in place.

    ONE kernel per tensor (see :func:`_once_factory`): its first loop writes the states and
    sums the channels, its second reads ``p`` and the states as stored; for a rule with
    ``rule.u_once = True`` (``u`` costly to recompute: AdamP's square root and division) the
    first loop also writes ``u`` to a buffer of the call and the second reads ``p`` and ``u``.
    Such a rule's tensors over :data:`ONCE_MAX` elements take the same in two kernels with a
    buffer for ``u`` kept across steps (see :func:`_fused_factory`: one more call, no fresh
    tensor-sized buffer per call), those over :data:`SCRATCH_MAX` a kernel that reads each
    tensor again and recomputes ``u`` (the kept buffer stays bounded).

    ``layout[i]``: the row count of view ``i``'s ``(rows, cols)`` form (``None``: its local
    rows); a caller that regroups a tensor's elements into other rows gives ``decide`` scalars
    under which the rows need not be channels.

    Returns the indices of the views it did not update (all from the first whose kernel could
    not be compiled): the caller runs those through the three-step form.  Takes a step
    ``GradScaler`` skips back from the updated views' ``step`` counters.
    """
    if len(scalars) != len(views) or (layout is not None and len(layout) != len(views)):
        raise ValueError(
            f"_rule_rows: {len(views)} views need as many scalar sets ({len(scalars)})"
            + ("" if layout is None else f" and row counts ({len(layout)})")
        )
    grad_scale, found_inf = K.scaler_of(opt)
    names = tuple(scalars[0])
    key = (rule, tuple(states), names, tuple(sorted(options.items())), tuple(sums), decide)
    if key in _failed:
        return list(range(len(views)))
    dev = views[0].data.device
    inv = None if grad_scale is None else grad_scale.to(dev, torch.float32).reciprocal()
    fi = None if found_inf is None else found_inf.to(dev, torch.float32)
    u_once = getattr(rule, "u_once", False)
    states = tuple(states)
    packs: dict[tuple, Tensor] = {}
    by_id: dict[int, Tensor] = {}  # a mapping given for several views is packed once
    # every tensor's arguments first, then the calls back to back: the Python between two
    # calls is then the call alone (code and data run cold after a kernel streamed megabytes)
    work = []
    for i, (v, vals) in enumerate(zip(views, scalars)):
        sc = by_id.get(id(vals))
        if sc is None:
            values = tuple([float(vals[n]) for n in names])
            sc = packs.get(values)
            if sc is None:
                sc = packs[values] = device_tensor(values, torch.float64, dev)  # no stream sync
                private(sc)
            by_id[id(vals)] = sc
        rows = (layout[i] if layout is not None else None) or local_rows(v)
        if rows == 0:
            continue
        cols = v.data.numel() // rows
        copies: list[tuple[Tensor, Tensor]] = []
        kept = kept_aliases(
            _row_aliases, (id(v.param), states, rows), v, states,
            lambda d, ts: _rows_pair(d, ts, rows),  # noqa: B023 - called at once
        )  # fmt: skip
        if kept is not None:
            p, sts = kept
        else:
            p = _as_rows(v.data, rows, cols, copies)
            sts = tuple([_as_rows(v.state[n], rows, cols, copies) for n in states])
        g = _grad_rows(v.grad, rows, cols)
        n = rows * cols
        kind = "once"  # "two": store + finish with the kept u; "": u recomputed
        if u_once and n > ONCE_MAX:
            kind = "two" if n <= SCRATCH_MAX else ""
        one = _ones(rows, p.dtype, dev) if kind else None
        work.append((i, kind, p, g, sts, sc, one, copies))
    once: Callable[..., Any] | None = None
    fused: Callable[..., Any] | None = None
    for i, kind, p, g, sts, sc, one, copies in work:
        try:
            if kind == "once":
                if once is None:
                    once = _kernel(key, "once", True)
                once(p, g, sts, sc, one, inv, fi)
            elif kind:
                u = _scratch(p.numel(), p.dtype, dev).view(p.shape)
                stats = _kernel(key, "store", True)(p, g, sts, sc, one, inv, fi, u)
            else:
                if fused is None:
                    fused = _kernel(key, "fused", True)
                fused(p, g, sts, sc, None, inv, fi)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the three-step form
            return _fall_back(key, rule, exc, views, i, found_inf)
        if kind == "two":
            try:
                _kernel(key, "finish", True)(p, u, stats, sc, fi)
            except Exception as exc:  # noqa: BLE001 - the states are stored: finish it eagerly
                _kernel(key, "finish", False)(p, u, stats, sc, fi)
                for t, c in copies:
                    t.copy_(c.view(t.shape))
                return _fall_back(key, rule, exc, views, i + 1, found_inf)
        for t, c in copies:
            t.copy_(c.view(t.shape))
    if found_inf is not None:
        _take_back(views, found_inf)
    return []


def _fall_back(
    key: tuple,
    rule: Callable[..., Any],
    exc: Exception,
    views: Sequence[ParamView],
    i: int,
    found_inf: Tensor | None,
) -> list[int]:
    """A kernel of :func:`fused_update` did not compile: views ``i:`` take the three-step form
    (their indices are returned); the step of views ``:i`` is taken back if skipped."""
    _failed.add(key)
    log.warning(
        "distopt: compiling the %s fused per-channel kernels failed (%s: %s); running the "
        "three-step form (set %s=eager to skip compiling)",
        rule.__name__, type(exc).__name__, exc, K.ENV,
    )  # fmt: skip
    if found_inf is not None:
        _take_back(views[:i], found_inf)
    return list(range(i, len(views)))


#: the largest tensor (elements) that takes :func:`fused_update`'s one-call ``once`` kernel
#: (``u_once`` rules): its buffer for ``u`` comes from the allocator at every call, which
#: reuses freed memory for a few MB (a fresh buffer of tens of MB is new pages, faulted in at
#: every call: a 10M-element AdamP tensor took 32 ms instead of 18); larger ones take the
#: ``store``/``finish`` kernels and their kept buffer (up to :data:`SCRATCH_MAX`)
ONCE_MAX = 1 << 20
#: the largest tensor (elements) whose ``u`` the ``store``/``finish`` kernels keep in their
#: buffer (one per dtype and device, kept across steps); larger ones take the recomputing form
SCRATCH_MAX = 1 << 24
_ONES: dict[tuple, Tensor] = {}
_SCRATCH: dict[tuple, Tensor] = {}


def _ones(rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``(rows, 1)`` column of ones (cached per row count, dtype and device)."""
    k = (rows, dtype, device)
    one = _ONES.get(k)
    if one is None:
        if len(_ONES) > 256:
            _ONES.clear()
        one = _ONES[k] = torch.ones(rows, 1, dtype=dtype, device=device)
        private(one)
    return one


def _scratch(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``n`` elements of the buffer that carries ``u`` from :func:`fused_update`'s ``store``
    kernel to its ``finish`` kernel: one per dtype and device, as large as the largest tensor
    it served (kept across steps: no allocation, no fresh pages, per call)."""
    k = (dtype, device)
    buf = _SCRATCH.get(k)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[k] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def _take_back(views: Sequence[ParamView], found_inf: Tensor) -> None:
    """A step ``GradScaler`` skipped does not count: ``step -= found_inf``."""
    for v in views:
        step = v.state.get("step")
        if isinstance(step, Tensor):
            step.sub_(found_inf.to(step.device, step.dtype))
