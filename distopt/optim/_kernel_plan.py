"""How :func:`distopt.optim._kernel.apply` covers a param group's tensors with kernel calls.

Every compiled kernel call costs tens of microseconds of ``torch.compile`` bookkeeping (guards,
wrappers) whatever the tensor's size, so the runner makes as few calls as the maths allows:

* a large tensor: one call; with whole-tensor sums, one ``fused`` call (sums, then the update
  in the same kernel) when nothing needs summing across ranks, else a ``sums`` call, one
  reduction for the whole group (:meth:`StepContext.reduce`) and an ``update`` call;
* small tensors (under ``_kernel.SMALL`` elements) of one scalar set: concatenated into one
  call; with sums, equal-sized ones are stacked as the rows of a 2-D tensor (``*_rows``
  kernels: the sums per row, the update with one column of statistics per sum), when the rule
  takes statistics of shape ``(n, 1)`` exactly as it takes 0-dim ones (:func:`rows_ok`);
* in eager mode, or for a tensor that cannot be flattened: one call per tensor, as before.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from distopt.optim import _kernel as K
from distopt.optim._core import ParamView, StepContext
from distopt.optim._functional import device_tensor
from distopt.optim._kernel_compile import private

__all__ = ["run", "rows_ok", "RowsFailed"]

log = logging.getLogger(__name__)


def run(
    kern: Any,
    views: Sequence[ParamView],
    states: tuple[str, ...],
    per_view: Sequence[Mapping[str, float]],
    names: tuple[str, ...],
    sums: tuple[str, ...],
    ctx: StepContext | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    given: Sequence[Tensor] | None = None,
) -> None:
    """Run ``kern`` (a ``_kernel._Kernels``) over ``views`` (see the module docstring);
    ``given``: the caller's whole-tensor values of ``sums``, one ``(len(sums),)`` tensor per
    view (then only update calls, units grouped as with sums)."""
    packs: dict[tuple, Tensor] = {}
    aux: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}
    compiled = kern.compiled
    small = K.SMALL
    one: list[tuple[int, bool]] = []  # (view index, flat)
    flats: list[Any] = []  # per view: its kept flat aliases (see _kept), or None
    groups: dict[tuple, list[int]] = {}
    scs: list[Tensor] = []
    # the previous view's mapping, device and pack: the same mapping object (one for all, or
    # one per distinct step count) on the same device is the same pack, without hashing values
    last_sv: Any = None
    last_dev: Any = None
    vals: tuple[float, ...] = ()
    sc: Any = None
    # a dict's values in ``names`` order -> their floats: per-view mappings of equal values
    # (one dict per view, e.g. Nadam's) convert once (~3 us a view otherwise); equal values
    # give equal floats, and the packs are looked up by value as before
    floats: dict[tuple, tuple[float, ...]] = {}
    for i, v in enumerate(views):
        sv = per_view[i]
        data = v.data
        dev = data.device
        if sv is not last_sv or dev != last_dev:
            if sv is not last_sv:
                if type(sv) is dict and tuple(sv) == names:
                    raw = tuple(sv.values())
                    vals = floats.get(raw)  # type: ignore[assignment]
                    if vals is None:
                        vals = floats[raw] = tuple([float(x) for x in raw])
                else:
                    vals = tuple([float(sv[n]) for n in names])
                last_sv = sv
            last_dev = dev
            sc = packs.get((vals, dev))
            if sc is None:
                sc = packs[(vals, dev)] = device_tensor(vals, torch.float64, dev)  # no stream sync
                private(sc)
            if dev not in aux:
                inv = None if grad_scale is None else grad_scale.to(dev, torch.float32).reciprocal()
                if inv is not None:
                    private(inv)  # a new tensor (found_inf.to may return found_inf itself)
                fi = None if found_inf is None else found_inf.to(dev, torch.float32)
                aux[dev] = (inv, fi)
        scs.append(sc)
        n = data.numel()
        if compiled and n < small:  # concatenated with others, or its aliases made when alone
            flat = n >= 2 and v.grad.is_contiguous() and _flat_ok(data, v.state, states)
            flats.append(None)
        else:
            kept = _kept(v, states) if n >= 2 and v.grad.is_contiguous() else None
            flat = kept is not None
            flats.append(kept)
        if compiled and flat and n < small:
            # one pack per (values, device) in this call: the pack's identity stands for them
            gk = (id(sc), data.dtype, n) if sums else (id(sc), data.dtype)
            groups.setdefault(gk, []).append(i)
        else:
            one.append((i, flat))

    # units: (kind, view indices, flat); kind: "one", "cat" (1-D concatenation), "rows" (2-D)
    units: list[tuple[str, list[int], bool]] = [("one", [i], flat) for i, flat in one]
    for gk, idx in groups.items():
        if len(idx) == 1:
            units.append(("one", idx, True))
        elif not sums:
            units.append(("cat", idx, True))
        elif rows_ok(kern, gk[1], scs[idx[0]]):
            units.append(("rows", idx, True))
        else:
            units.extend(("one", [i], True) for i in idx)

    local = not sums or given is not None or not any(v.sharded for v in views)
    # the flat tensors each concatenated unit is copied back into (after its kernel call)
    dsts: dict[int, _Concat] = {}
    prepared = [
        _tensors(kind, [views[i] for i in idx], states, flat, dsts, u, flats[idx[0]])
        for u, (kind, idx, flat) in enumerate(units)
    ]
    broken: set[int] = set()  # rows units whose kernel did not compile: run tensor by tensor

    def call(u: int, phase: str, st: Tensor | None) -> Any:
        kind, idx, flat = units[u]
        sc, (inv, fi) = scs[idx[0]], aux[views[idx[0]].data.device]
        if phase == "sums":
            fi = None
        if kind != "rows":
            return kern.call(phase, flat, *prepared[u], sc, st, inv, fi)
        if u not in broken:
            try:
                return kern.call(phase + "_rows", True, *prepared[u], sc, st, inv, fi)
            except RowsFailed as exc:
                log.debug("distopt: %s: %s", kern.key[0].__name__, exc.__cause__)
                broken.add(u)
                _rows[(kern.key, views[idx[0]].data.dtype)] = False
        alone = [_tensors("one", [views[i]], states, True, {}, 0, flats[i]) for i in idx]
        out = [
            kern.call(phase, True, *ts, sc, s_, inv, fi)
            for ts, s_ in zip(alone, [None] * len(idx) if st is None else st.unbind(0))
        ]
        return torch.stack(out) if phase == "sums" else None

    if given is not None:
        for u, (kind, idx, _) in enumerate(units):
            st = given[idx[0]] if kind == "one" else torch.stack([given[i] for i in idx])
            call(u, "update", st)
    elif not sums:
        for u in range(len(units)):
            call(u, "update", None)
    elif local and compiled:
        for u in range(len(units)):
            call(u, "fused", None)
    else:
        stats = [call(u, "sums", None) for u in range(len(units))]
        if not local:
            stats = _reduced(ctx, views, units, stats)
        for u, st in enumerate(stats):
            call(u, "update", st)
    for u, dst in dsts.items():
        if u not in broken:
            _scatter(prepared[u], dst)


class RowsFailed(Exception):
    """A ``*_rows`` kernel did not compile (the runner then takes its tensors one by one)."""


def _reduced(
    ctx: StepContext | None,
    views: Sequence[ParamView],
    units: list[tuple[str, list[int], bool]],
    stats: list[Tensor],
) -> list[Tensor]:
    """The units' local sums added across ranks: one :meth:`StepContext.reduce` for all."""
    if ctx is None:
        raise ValueError("apply: `sums` needs the StepContext (ctx=) to reduce them across ranks")
    rows: list[Tensor | None] = [None] * len(views)
    for (kind, idx, _), st in zip(units, stats):
        if kind == "one":
            rows[idx[0]] = st
        else:
            for j, i in enumerate(idx):
                rows[i] = st[j]
    (red,) = ctx.reduce([rows], list(views))
    return [
        red[idx[0]] if kind == "one" else torch.stack([red[i] for i in idx])
        for kind, idx, _ in units
    ]


def _tensors(
    kind: str,
    group: list[ParamView],
    states: tuple[str, ...],
    flat: bool,
    dsts: dict[int, Any],
    u: int,
    kept: Any = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``(p, g, states)`` of a unit: flat aliases of one tensor, its own tensors (not flat), or
    the concatenation of a group (``rows``: viewed as ``(tensors, elements)``) into the group's
    kept buffers (:class:`_Concat`), which go to ``dsts[u]`` (:func:`_scatter` copies the
    results back into the parameters and states)."""
    if kind == "one":
        v = group[0]
        if not flat:
            return v.data, v.grad, tuple(v.state[s] for s in states)
        p, sts = kept or _kept(v, states)  # type: ignore[misc]  # the caller checked it is flat
        return p, _grad_flat(v.grad), sts
    key = (states, kind, tuple([id(v.param) for v in group]))
    c = _concats.get(key)
    if c is None or not c.holds(group, states):
        c = _Concat(key, group, states, kind == "rows")
    dsts[u] = c
    return c.fill(group)


def _scatter(ts: tuple[Tensor, Tensor, tuple[Tensor, ...]], dst: Any) -> None:
    """Copy a group's updated concatenation back into its parameters and states (``dst``:
    the group's :class:`_Concat`): one multi-tensor copy."""
    torch._foreach_copy_(dst.dst, dst.src)


def _flat1(t: Tensor) -> Tensor:
    """``t`` as one dimension (itself when it has one: no new view)."""
    return t if t.dim() == 1 else t.view(-1)


#: (states, kind, parameter ids) -> the kept concatenation buffers of a group of small tensors
_concats: dict[tuple, _Concat] = {}
#: more groups than this: the kept buffers are all dropped (a run whose small tensors change
#: from step to step does not keep them without bound)
_MAX_CONCATS = 512


class _Concat:
    """The concatenation of a group of small tensors, kept across steps.

    The group's state tensors are **views of the kept buffers**: when the buffers are made, each
    state's values are copied into its buffer and ``state[name]`` becomes a view of it (same
    shape, dtype, device and values), so the kernel updates the states in place and nothing is
    copied for them, before or after.  The parameters cannot be views of a buffer: each step
    their values and the gradients are concatenated into the buffers (the parameters' buffer
    kept: the same tensors every step, so the kernel call keeps its argument signature), and one
    ``_foreach_copy_`` writes the parameters back through flat views made once.  A state column
    whose tensors are not plain tensors of one dtype and device is copied like the parameters.

    Valid while every view's parameter, its memory (address, shape, dtype) and its state tensors
    (identity and address) are the ones it was made from (:meth:`holds`): a state replaced (a
    ``load_state_dict``, a checkpoint loaded into new tensors) or given new memory makes a new
    concatenation, which copies the current values; a write into a state in place (a checkpoint
    read into it, ``copy_``) lands in the buffer.  Saved state views are ordinary tensors
    (``torch.save`` writes a buffer once; DCP clones a tensor smaller than its storage).
    Dropped when a parameter or a state tensor goes (weak references: an optimizer's states are
    not kept alive by this cache once the optimizer or its state is gone).
    """

    def __init__(
        self, key: tuple, group: list[ParamView], states: tuple[str, ...], rows: bool
    ) -> None:
        if len(_concats) >= _MAX_CONCATS:
            _concats.clear()
        drop = _dropper(_concats, key)
        self.owners = [weakref.ref(v.param, drop) for v in group]
        self.ptrs = [(v.data.data_ptr(), v.data.shape, v.data.dtype) for v in group]
        # flat aliases without a base (a view would keep its base, the state, alive)
        params = [_flat(v.data) for v in group]
        self.sizes = sizes = [t.numel() for t in params]
        self.rows = len(group) if rows else 0
        bufs = [torch.cat(params)]
        self.flats = [params]  # the columns copied into their buffer each step
        self.flatbufs = [bufs[0]]
        for s in states:
            col = [v.state[s] for v in group]
            buf = torch.cat([_flat(t) for t in col])
            bufs.append(buf)
            if _adoptable(col):
                for v, t, new in zip(group, col, torch.split(buf, sizes)):
                    v.state[s] = new.view(t.shape)
            else:
                self.flats.append([_flat(t) for t in col])
                self.flatbufs.append(buf)
        cols = [[v.state[s] for v in group] for s in states]
        self.states = [[weakref.ref(t, drop) for t in col] for col in cols]
        self.sptrs = [[t.data_ptr() for t in col] for col in cols]
        self.bufs = [b.view(self.rows, -1) if rows else b for b in bufs]
        private(*self.bufs)
        self.dst = [t for col in self.flats for t in col]
        self.src = [x for b in self.flatbufs for x in torch.split(b, sizes)]
        _concats[key] = self

    def holds(self, group: list[ParamView], states: tuple[str, ...]) -> bool:
        """Whether ``group`` still has the parameters, memory and states this was made from."""
        for v, owner, (ptr, shape, dtype) in zip(group, self.owners, self.ptrs):
            d = v.data
            if (
                owner() is not v.param
                or d.data_ptr() != ptr
                or d.dtype != dtype
                or d.shape != shape
            ):
                return False
        for s, col, ptrs in zip(states, self.states, self.sptrs):
            for v, t, ptr in zip(group, col, ptrs):
                t2 = v.state[s]
                if t() is not t2 or t2.data_ptr() != ptr:
                    return False
        return True

    def fill(self, group: list[ParamView]) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """This step's values in the buffers: ``(p, g, states)`` (``g`` a fresh concatenation)."""
        for b, col in zip(self.flatbufs, self.flats):
            torch.cat(col, out=b)
        g = torch.cat([_flat1(v.grad) for v in group])
        if self.rows:
            g = g.view(self.rows, -1)
        bufs = self.bufs
        return bufs[0], g, tuple(bufs[1:])


def _adoptable(col: list[Tensor]) -> bool:
    """Whether a group's state tensors can become views of one buffer: plain tensors (no
    subclass, no gradient) of one dtype and device, each its own tensor."""
    t0 = col[0]
    dtype, device = t0.dtype, t0.device
    return len({id(t) for t in col}) == len(col) and all(
        type(t) is Tensor and t.dtype == dtype and t.device == device and not t.requires_grad
        for t in col
    )


#: (id(parameter), state names) -> an entry of :func:`kept_aliases` whose result is the flat
#: aliases ``(values, states)``: kept across steps (two tensor ops per tensor and step
#: otherwise, and the contiguity checks); rebuilt when the values' memory, shape, dtype or
#: layout changed or a state tensor was replaced
_aliases: dict[tuple, tuple] = {}


def _kept(v: ParamView, states: tuple[str, ...]) -> tuple[Tensor, tuple[Tensor, ...]] | None:
    """Flat aliases ``(values, states)`` of a view's parameter values and ``states``, kept
    across steps (see ``_aliases``), or ``None`` where they cannot be flattened (a
    non-contiguous tensor, a state not shaped like the values)."""
    return kept_aliases(_aliases, (id(v.param), states), v, states, _flat_pair)


def _flat_pair(data: Tensor, ts: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]] | None:
    return alias_pair(data, ts, _flat)


def alias_pair(
    data: Tensor, ts: tuple[Tensor, ...], make: Callable[[Tensor], Tensor]
) -> tuple[Tensor, tuple[Tensor, ...]] | None:
    """``(make(data), tuple(make(t) for t in ts))`` (aliases: flat, or ``(rows, cols)``), noted
    :func:`~distopt.optim._kernel_compile.private`, or ``None`` where ``data`` or one of ``ts``
    is not contiguous or a state is not shaped like ``data`` (a ``make`` for
    :func:`kept_aliases`)."""
    shape = data.shape
    if not data.is_contiguous() or any(not t.is_contiguous() or t.shape != shape for t in ts):
        return None
    p, sts = make(data), tuple(make(t) for t in ts)
    private(p, *sts)  # the kernels' signatures read their metadata once (see Compiled)
    return p, sts


def kept_aliases(
    cache: dict[Any, tuple],
    key: Any,
    v: ParamView,
    states: tuple[str, ...],
    make: Callable[[Tensor, tuple[Tensor, ...]], Any],
) -> Any:
    """``make(values, state tensors)`` for view ``v`` (aliases of its parameter's values and of
    its ``states``, or ``None`` where they cannot be made), kept in ``cache`` under ``key``
    across steps.

    The kept result is returned while the parameter is the same object, its values' memory,
    shape and dtype are unchanged and contiguous, and each state is the same tensor at the same
    address, shape and contiguity; otherwise ``make`` runs again.  The entry holds the parameter
    and states by weak reference and goes when one of them does."""
    data, st = v.data, v.state
    e = cache.get(key)
    if (
        e is not None
        and e[0]() is v.param
        and e[1] == data.data_ptr()
        and e[2] == data.shape
        and e[3] == data.dtype
        and data.is_contiguous()
        and e[5] == states
    ):
        for s, ref, ptr, shape in e[4]:  # (name, weak reference, address, shape) per state
            t = st[s]
            if ref() is not t or t.data_ptr() != ptr or t.shape != shape or not t.is_contiguous():
                break
        else:
            return e[6]
    ts = tuple(st[s] for s in states)
    out = make(data, ts)
    if out is None:
        return None
    drop = _dropper(cache, key)
    cache[key] = (
        weakref.ref(v.param, drop),
        data.data_ptr(),
        data.shape,
        data.dtype,
        tuple((s, weakref.ref(t, drop), t.data_ptr(), t.shape) for s, t in zip(states, ts)),
        states,
        out,
    )
    return out


def _dropper(cache: dict, key: Any) -> Callable[[Any], None]:
    """A weakref callback that removes ``key`` from ``cache``."""
    return lambda _: cache.pop(key, None)


#: id(gradient) -> (weak reference, address, shape, dtype, flat alias): a gradient that stays
#: the same tensor across steps (``zero_grad(set_to_none=False)``, gradients kept as views of
#: flat buckets) keeps its flat alias (a view and a detach per step, ~3 us, and the alias's
#: signature entry otherwise); a fresh gradient each step adds one entry, which goes with it
_grads: dict[int, tuple] = {}


def _grad_flat(g: Tensor) -> Tensor:
    """A flat alias of the contiguous gradient ``g`` (as :func:`_flat`), kept while ``g`` is
    the same tensor at the same address, shape and dtype, still contiguous."""
    return kept_grad(_grads, g, _flat)


def kept_grad(
    cache: dict[int, tuple], g: Tensor, make: Callable[[Tensor], Tensor], extra: Any = None
) -> Tensor:
    """``make(g)`` (an alias of the contiguous gradient ``g``: flat, or ``(rows, cols)``),
    noted :func:`~distopt.optim._kernel_compile.private` and kept in ``cache`` while ``g`` is
    the same tensor at the same address, shape and dtype, still contiguous, and ``extra``
    (whatever else ``make`` depends on, e.g. the row count) is the same.  A gradient accumulated
    in place stays one tensor across steps; a fresh gradient each step adds one entry, which
    goes with it (weak reference).  Entries: ``(ref, address, shape, dtype, alias, extra)``."""
    key = id(g)
    e = cache.get(key)
    if (
        e is not None
        and e[0]() is g
        and e[1] == g.data_ptr()
        and e[2] == g.shape
        and e[3] == g.dtype
        and e[5] == extra
        and g.is_contiguous()
    ):
        return e[4]
    a = make(g)
    private(a)
    cache[key] = (weakref.ref(g, _dropper(cache, key)), g.data_ptr(), g.shape, g.dtype, a, extra)
    return a


def _flat_ok(data: Tensor, state: Mapping[str, Tensor], states: tuple[str, ...]) -> bool:
    """Whether ``data`` and its ``states`` can be flattened (what :func:`_kept` requires)."""
    if not data.is_contiguous():
        return False
    shape = data.shape
    for s in states:
        t = state[s]
        if not t.is_contiguous() or t.shape != shape:
            return False
    return True


def _flat(t: Tensor) -> Tensor:
    """``t`` as one dimension, sharing its storage and version counter but not a view.

    ``torch.compile`` guards on the base of a view (its rank and strides), so views of 1-, 2-,
    3- and 4-d parameters would each compile the kernel again; ``detach()`` of the flat view
    has no base (and still shares the version counter: in-place writes stay visible).
    """
    return t.detach() if t.dim() == 1 else t.view(-1).detach()


# --------------------------------------------------------------------------- rows: the probe

_rows: dict[Any, bool] = {}


class _Mixing(torch.overrides.TorchFunctionMode):
    """Notes any op that combines a float64 tensor of >= 1 dims with another floating dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        ts = [
            t
            for t in tree_leaves((args, kwargs))
            if isinstance(t, Tensor) and t.dim() > 0 and t.is_floating_point()
        ]
        if any(t.dtype == torch.float64 for t in ts) and any(t.dtype != torch.float64 for t in ts):
            self.mixed = True
        return func(*args, **kwargs)


def rows_ok(kern: Any, dtype: torch.dtype, sc: Tensor) -> bool:
    """Whether the rule's update gives the same numbers with each statistic as an ``(n, 1)``
    float64 column as with a 0-dim one (what stacking small tensors as rows needs).

    A 0-dim float64 tensor takes the dtype of the tensor it meets (float32 maths); an ``(n, 1)``
    one promotes it to float64.  So rows are only used for a rule in which no statistic-derived
    value meets a non-float64 tensor before an explicit ``.to(dtype)`` (as Lars' trust ratio
    does): checked once per (rule, options, dtype) on a tiny eager run, ops watched by a
    :class:`torch.overrides.TorchFunctionMode`.
    """
    key = (kern.key, dtype)
    ok = _rows.get(key)
    if ok is None:
        ok = _rows[key] = _probe_rows(kern.key, dtype, sc)
    return ok


def _probe_rows(key: tuple, dtype: torch.dtype, sc: Tensor) -> bool:
    rule, states, names, options, sums = key
    if dtype == torch.float64:
        return True
    dev = sc.device
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, dt: torch.dtype = dtype) -> Tensor:
        return (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5).to(dev, dt)

    p, g = rand(2, 3), rand(2, 3)
    old = {s: rand(2, 3) for s in states}
    s = dict(zip(names, sc.unbind(0)))
    s.update({k: rand(2, 1, dt=torch.float64) for k in sums})
    mode = _Mixing()
    try:
        with torch.no_grad(), mode:
            new_p, new = rule(p, g, old, s, phase="update", **dict(options))
    except Exception:  # noqa: BLE001 - a rule that does not take columns: no rows
        return False
    outs = [new_p, *new.values()]
    return not mode.mixed and all(isinstance(t, Tensor) and t.dtype == dtype for t in outs)


def eager_chunks(
    fn: Callable[..., None],
    data: Tensor,
    grad: Tensor,
    sts: tuple[Tensor, ...],
    sc: Tensor,
    stats: Tensor | None,
    inv: Tensor | None,
    fi: Tensor | None,
) -> None:
    """``fn`` eagerly over a flat tensor, in ``_kernel.EAGER_CHUNK``-sized pieces when large
    (cache-sized temporaries instead of fresh tensor-sized allocations per op)."""
    n, chunk = data.numel(), K.EAGER_CHUNK
    if n > 2 * chunk:
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            fn(data[a:b], grad[a:b], tuple(t[a:b] for t in sts), sc, stats, inv, fi)
        return
    fn(data, grad, sts, sc, stats, inv, fi)
