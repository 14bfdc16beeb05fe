"""Factored second moments in few passes: the runner of Adafactor's and AdafactorBigVision's step.

The maths (the per-tensor phases, stated once) is :mod:`distopt.optim._factored`; this module runs
it over a param group, compiled (``torch.compile(dynamic=True, fullgraph=True)`` through
:func:`distopt.optim._kernel.compiled_kernel`: repeated calls skip dynamo; one kernel per phase
and option set) or eagerly under the same switch as :mod:`distopt.optim._kernel`
(``DISTOPT_KERNELS`` / ``_kernel.mode()``):

* a factored tensor whose statistics are all local (not sharded) and without the cautious mask
  takes ONE call (:func:`~distopt.optim._factored.step_factored`): statistics, factors, the
  per-tensor scales and the update, with no reduction in between (the sum of ``p^2`` for the
  parameter RMS is summed in the statistics loop from the current ``p`` every step: a sum
  carried from the previous step's update loop saved a read of ``p`` but rounds differently
  from a fresh sum, so a resumed run would not continue bit for bit);
* the other tensors take the phases: ``stats`` (one read of ``g``, and of ``p`` for the
  parameter RMS), one :meth:`StepContext.reduce` of the partial sums, ``precond`` (factored
  only: the statistics that needed the sums, the row and column factors and the sum of ``u^2``),
  one reduce of the update's sums of squares, :func:`~distopt.optim._factored.scales` for all
  of them at once, then ``apply`` (with an extra ``mask`` phase and reduce for the cautious
  mask's count).  Unfactored tensors of one shape, dtype and scalar pack (biases, norm weights)
  are stacked into one ``(rows, cols)`` call per phase.

The reduce calls are made in every case (a rank's fused tensors send empty entries), so every
rank makes the same collectives.  ``torch.amp.GradScaler``: the gradient is multiplied by
``1 / grad_scale`` inside each phase and every written value is kept where ``found_inf`` is set
(see :mod:`._kernel`); nothing is read back to the host.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _kernel as K
from distopt.optim._core import ParamView, StepContext
from distopt.optim._factored import (  # the runner calls the phases by these module names
    BLOCK,
    SC,
    Layout,
    Options,
    apply_factored,
    apply_plain,
    layout,
    pack,
    precond_factored,
    scales,
    stats_factored,
    stats_plain,
    step_factored,
)
from distopt.optim._functional import device_tensor
from distopt.optim._kernel_compile import private
from distopt.optim._kernel_plan import kept_aliases, kept_grad
from distopt.optim._state_stacks import kept_stacks

__all__ = ["Layout", "layout", "Options", "pack", "run", "SC", "EAGER_BELOW"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the runner

#: in compile mode, a call on fewer elements runs eagerly: a compiled call's fixed cost (guards,
#: wrappers: ~50-100 us on a CPU) is more than the eager ops on it, and small tensors' degenerate
#: shapes (size-1 dims, which dynamic shapes specialise) would each compile a phase again
EAGER_BELOW = 1 << 15  # ViT-S: the stacks of its biases and norms (75 x 384, 12 x 1536) too

_kernels: dict[Any, Callable[..., Any]] = {}
_failed: set[Any] = set()

#: inductor options added for the statistics of transformers/timm Adafactor (``opt.psq``): the
#: sums of ``p^2`` and of ``g^2`` share only a scalar read (see ``_factored.stats_factored``);
#: inductor fuses loops that share less than ``score_fusion_memory_threshold`` (10) bytes only
#: when it is lowered.  A/B in one process (ViT-S, 1 thread, thread CPU time, 25 interleaved
#: rounds, loaded machine): step time x0.92 (Adafactor), x0.96 (AdafactorTimm).  Big Vision
#: (no sum of ``p^2``: nothing to fuse) and the other phases keep the runner's options.
FUSION_OPTIONS = {"score_fusion_memory_threshold": 0}


def fusion_options(fn: Callable[..., Any], opts: dict[str, Any]) -> dict[str, Any]:
    """The extra inductor options of the kernel of phase ``fn`` with static options ``opts``
    (empty where none apply, or where this torch's inductor does not list them)."""
    opt = opts.get("opt")
    if fn not in (step_factored, stats_factored) or opt is None or not opt.psq:
        return {}
    known = K.inductor_options()
    return {k: v for k, v in FUSION_OPTIONS.items() if k in known}


def _blocks(compiled: bool, lay: Layout, opt: Options) -> bool:
    """Whether a call's sums over dim 1 run in blocks of rows (``_factored._sum``): compiled
    calls on at least :data:`~distopt.optim._factored.BLOCK` rows, except Big Vision's on a
    5-D view that is no plain matrix (``P``, ``M`` or ``S`` above 1: a patch embedding, a
    convolution kernel).  Such a view compiles a graph of its own (dynamic shapes specialise
    size-1 dims), the largest with blocks; ViT-S, cold first step, thread + child CPU under
    load: blocks everywhere ~+18% over none, on its matrices only ~+10%.  Its step: x0.90 of
    none with blocks on the matrices, x0.89 everywhere.  Running the patch embedding eagerly
    instead saved a graph but cost ~2 ms of page faults per step (its eager temporaries)."""
    p, rows, m, _, s = lay.shape5
    if not compiled or rows < BLOCK:
        return False
    return opt.flavour == "hf" or p == m == s == 1


def _kernel(
    fn: Callable[..., Any], compiled: bool, opts: tuple[tuple[str, Any], ...]
) -> Callable[..., Any]:
    key = (fn, opts, compiled)
    k = _kernels.get(key)
    if k is None:
        kw = dict(opts)

        def kernel(*args: Any) -> Any:
            return fn(*args, **kw)

        # one code object per (phase, options): torch.compile's cache and recompile limit are
        # per code object, so the kernels never evict each other
        k = K._named(kernel, f"distopt_{fn.__name__}")
        if compiled:  # _kernel's backend and options; repeated calls skip dynamo
            k = K.compiled_kernel(k, options=fusion_options(fn, kw) or None)
        _kernels[key] = k
    return k


def _call(fn: Callable[..., Any], compiled: bool, *args: Any, **opts: Any) -> Any:
    """``fn(*args, **opts)`` compiled (when ``compiled`` and it compiles) or eagerly."""
    key = tuple(sorted(opts.items()))
    if compiled and (fn, key) not in _failed:
        try:
            return _kernel(fn, True, key)(*args)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the same maths eagerly
            _failed.add((fn, key))
            log.warning(
                "distopt: compiling %s failed (%s: %s); running it eagerly (set %s=eager to skip "
                "compiling)",
                fn.__name__,
                type(exc).__name__,
                exc,
                K.ENV,
            )
    return _kernel(fn, False, key)(*args)


def _as5(t: Tensor, shape: Sequence[int], back: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``t`` viewed with ``shape``, detached (same storage and version counter, no view base:
    ``torch.compile`` guards on a view's base, so the views of 2-, 3- and 4-d parameters would
    each compile the phase again); a non-contiguous ``t`` gets a contiguous copy written back
    after the phase (recorded in ``back``)."""
    if t.is_contiguous():
        return t.view(shape).detach()
    c = t.reshape(shape).clone()
    back.append((t, c))
    return c


#: (id(parameter), 5-D shape, state names) -> an entry of :func:`_kernel_plan.kept_aliases`
#: whose result is the 5-D aliases of the values and states: kept across steps (a view and a
#: detach per tensor and step otherwise: ~4 ms of Big Vision's ViT-S step under load); rebuilt
#: when the values' memory, shape or dtype changed or a state tensor was replaced
_fives: dict[tuple, tuple] = {}


def _kept5(
    v: ParamView, shape5: tuple[int, ...], names: tuple[str, ...], shapes: tuple[tuple, ...]
) -> tuple[Tensor, ...] | None:
    """The 5-D aliases (as :func:`_as5`) of a view's values (``shape5``) and of its states
    ``names`` (``shapes``), kept across steps (see ``_fives``), or None where one of them is
    not contiguous (:func:`_as5` copies it)."""

    def make(data: Tensor, ts: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        if not data.is_contiguous() or not all(t.is_contiguous() for t in ts):
            return None
        out = (data.view(shape5).detach(),) + tuple(
            t.view(sh).detach() for t, sh in zip(ts, shapes)
        )
        private(*out)  # the kernels' signatures read their metadata once (see Compiled)
        return out

    return kept_aliases(_fives, (id(v.param), shape5, names), v, names, make)


#: id(gradient) -> an entry of :func:`_kernel_plan.kept_grad`: the 5-D alias of a gradient that
#: stays one tensor across steps (noted private); a fresh gradient each step adds one entry
_grads5: dict[int, tuple] = {}


def _grad5(g: Tensor, shape5: tuple[int, ...], back: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The 5-D alias of the gradient ``g`` (as :func:`_as5`): kept while ``g`` is the same
    contiguous tensor, else :func:`_as5`'s (a copy where ``g`` is not contiguous)."""
    if not g.is_contiguous():
        return _as5(g, shape5, back)
    return kept_grad(_grads5, g, lambda t: t.view(shape5).detach(), shape5)


def _swapped(v: ParamView, lay: Layout, opt: Options) -> bool:
    """Whether the runner, compiling without the clip, calls
    :func:`~distopt.optim._factored.step_factored` on ``v`` (factored as ``lay``) with its
    statistics swapped: a tensor of the one-call path (unsharded, no cautious mask) whose
    column statistic is the mean over the 5-D view's dim 1 (``dc == 1``), large enough to run
    compiled."""
    return lay.dc == 1 and not (v.sharded or opt.caution) and math.prod(lay.shape5) >= EAGER_BELOW


def _swap_packs(packs: Sequence[Sequence[float]], swaps: list[bool]) -> list[Sequence[float]]:
    """``packs`` with, where ``swaps`` says, a copy whose ``n_r`` and ``n_c`` are exchanged and
    ``swap`` is 1 (one copy per pack object: equal packs stay one object)."""
    made: dict[int, list[float]] = {}
    out: list[Sequence[float]] = []
    for values, swap in zip(packs, swaps):
        if swap:
            x = made.get(id(values))
            if x is None:
                x = made[id(values)] = list(values)
                x[SC["n_r"]], x[SC["n_c"]] = values[SC["n_c"]], values[SC["n_r"]]
                x[SC["swap"]] = 1.0
            values = x
        out.append(values)
    return out


def _own(t: Any) -> Any:
    """``t``, or a copy at storage offset 0 when it is a slice of a batched tensor (a compiled
    kernel guards on its inputs' storage offsets: slices at varying offsets would recompile)."""
    if isinstance(t, Tensor) and t.storage_offset() != 0:
        return t.clone()
    return t


def _with(shape5: Sequence[int], **ones: int) -> tuple[int, ...]:
    out = list(shape5)
    for d in ones.values():
        out[d] = 1
    return tuple(out)


def run(
    owner: Any,
    views: Sequence[ParamView],
    lays: Sequence[Layout | None],
    packs: Sequence[Sequence[float]],
    ctx: StepContext,
    opt: Options,
    *,
    state_names: tuple[str, str, str],
) -> list[Tensor | None]:
    """One step of a param group: ``views`` with their :class:`Layout` (None: unfactored), the
    host scalars of each (``packs[i][SC[name]]``), the reductions through ``ctx``; returns the lr
    each tensor was updated with (float64 0-dim tensors, transformers/timm; None for Big Vision).

    ``state_names``: the names of the row, column and unfactored second moments; the first
    moment is ``exp_avg``, the parameter RMS (with ``opt.psq``) ``RMS``.  ``owner``: the
    optimizer (its ``GradScaler`` attributes).  In compile mode, calls on fewer than
    :data:`EAGER_BELOW` elements run eagerly.
    """
    if not views:
        return []
    grad_scale, found_inf = K.scaler_of(owner)
    compiled = K.mode() == "compile" and K._can_compile(views[0].data.device)
    kr, kc, kv = state_names
    n = len(views)
    bv = opt.flavour == "bv"
    # the one-call path of compiled factored tensors without the clip: both orientations of a
    # matrix (dc before dr or after it) in one kernel, the statistics passed swapped for one
    # (see _factored._factors): a graph fewer to compile (ViT-S: Big Vision's matrices and
    # pos_embed in one graph instead of two)
    swaps = [False] * n
    if compiled and not opt.clip:
        swaps = [lay is not None and _swapped(v, lay, opt) for v, lay in zip(views, lays)]
        if any(swaps):
            packs = _swap_packs(packs, swaps)
    # one scalar tensor per distinct set of values (tensors of one shape share theirs); each its
    # own storage: a row of a shared pack would have a storage offset the kernels guard on
    # (float32 for Big Vision's float32 tensors: every use of its pack casts the value to the
    # data's float32 at that use, so a float32 pack holds the same values, and the kernels load
    # them as they are instead of converting a double per vector of elements, a scalar load the
    # C++ compiler does not hoist past the stores: ~3% of a ViT-S matrix's step, same numbers;
    # transformers/timm compute their lr in float64)
    sc: list[Tensor] = []
    made: dict[tuple, Tensor] = {}
    seen: dict[tuple, Tensor] = {}  # by pack object (alive: in ``packs``)
    aux: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}
    for v, values in zip(views, packs):
        dev = v.data.device
        dt = torch.float32 if bv and v.data.dtype == torch.float32 else torch.float64
        x = seen.get((id(values), dev, dt))
        if x is None:
            key = (tuple(values), dev, dt)  # floats (pack)
            x = made.get(key)
            if x is None:
                x = made[key] = device_tensor(key[0], dt, dev)  # no stream sync
                private(x)
            seen[(id(values), dev, dt)] = x
        sc.append(x)
        if dev not in aux:
            inv = None if grad_scale is None else grad_scale.to(dev, torch.float32).reciprocal()
            fi = None if found_inf is None else found_inf.to(dev, torch.float32)
            aux[dev] = (inv, fi)

    def runs_compiled(t: Tensor) -> bool:
        return compiled and t.numel() >= EAGER_BELOW

    back: list[tuple[Tensor, Tensor]] = []
    stacked: list[tuple[list[Tensor], Tensor]] = []
    ts: dict[int, tuple[Layout, dict[str, Tensor | None]]] = {}
    plain: dict[tuple, list[int]] = {}
    lrs: list[Tensor | None] = [None] * n
    for i, (v, lay) in enumerate(zip(views, lays)):
        m = v.state.get("exp_avg") if opt.momentum else None
        if lay is None:
            d = v.data
            stackable = not opt.caution and d.dtype == torch.float32
            key = (tuple(d.shape), d.device, id(sc[i]), None if m is None else m.dtype)
            plain.setdefault(key if stackable else (i,), []).append(i)
            continue
        s5 = lay.shape5
        r5, c5 = _with(s5, d=lay.dr), _with(s5, d=lay.dc)
        names = (kr, kc) if m is None else (kr, kc, "exp_avg")
        kept = _kept5(v, s5, names, (r5, c5, s5))
        if kept is not None:
            t = {"p": kept[0], "g": _grad5(v.grad, s5, back), "r": kept[1], "c": kept[2]}
            t["m"] = None if m is None else kept[3]
        else:
            t = {
                "p": _as5(v.data, s5, back),
                "g": _as5(v.grad, s5, back),
                "m": None if m is None else _as5(m, s5, back),
                "r": _as5(v.state[kr], r5, back),
                "c": _as5(v.state[kc], c5, back),
            }
        if v.sharded or opt.caution:
            ts[i] = (lay, t)
            continue
        # every statistic local: the whole step in one call
        inv, fi = aux[v.data.device]
        on = runs_compiled(t["p"])
        either = compiled and not opt.clip and on
        row, col, dc, dr = t["r"], t["c"], lay.dc, lay.dr
        if swaps[i]:
            row, col, dc, dr = col, row, dr, dc
        lrs[i], *_ = _call(
            step_factored,
            on,
            t["p"],
            t["g"],
            t["m"],
            row,
            col,
            v.state["RMS"] if opt.psq else None,
            sc[i],
            inv,
            fi,
            dc=dc,
            dr=dr,
            opt=opt,
            block=_blocks(on, lay, opt),
            **({"either": True} if either else {}),
        )
    # unfactored units: (view indices, rows per tensor, tensors as (rows, cols))
    units: list[tuple[list[int], int, dict[str, Tensor | None]]] = []
    for idx in plain.values():
        shape = views[idx[0]].data.shape
        numel = math.prod(shape)
        cols = shape[-1] if shape and numel else 1
        rows = numel // cols
        group = [views[i] for i in idx]
        names = (kv, "exp_avg") if opt.momentum else (kv,)
        kept_st = kept_stacks(group, names, len(idx) * rows, cols)
        if kept_st is None:
            kept_st = [_rows([v.state[s] for v in group], rows, cols, back, stacked) for s in names]
        tensors: dict[str, Tensor | None] = {
            "p": _rows([v.data for v in group], rows, cols, back, stacked),
            "g": _rows([v.grad for v in group], rows, cols, back, None),
            "v": kept_st[0],
            "m": kept_st[1] if opt.momentum else None,
        }
        units.append((idx, rows, tensors))
    rest = sorted(ts) + sorted(i for idx, _, _ in units for i in idx)  # the phased tensors

    # ---- phase 1: statistics (one read of g, and of p for its RMS)
    empty = views[0].data.new_zeros(0, dtype=torch.float32)
    rsum: list[Tensor] = [empty] * n
    csum: list[Tensor] = [empty] * n
    rnorm: list[Tensor] = [empty] * n
    wsum: list[Tensor] = [empty] * n
    rf: list[Tensor] = [empty] * n
    cf: list[Tensor] = [empty] * n
    psq: list[Tensor] = [empty] * n
    usq: list[Tensor] = [empty] * n
    for idx, rows, t in units:
        i = idx[0]
        inv, fi = aux[views[i].data.device]
        a, b = _call(
            stats_plain, runs_compiled(t["p"]), t["p"], t["g"], t["v"], sc[i], inv, fi, opt=opt
        )
        for out, x in ((psq, a), (usq, b)):
            if x is not None:
                per = x.view(len(idx), rows).sum(dim=1) if rows != 1 else x.view(len(idx))
                for j, y in zip(idx, per.view(len(idx), 1).unbind(0)):
                    out[j] = y
    for i, (lay, t) in ts.items():
        inv, fi = aux[views[i].data.device]
        on = runs_compiled(t["p"])
        r, c, nrm, w, ps = _call(
            stats_factored,
            on,
            t["p"],
            t["g"],
            t["r"],
            sc[i],
            inv,
            fi,
            dc=lay.dc,
            dr=lay.dr,
            row_local=lay.row_local,
            opt=opt,
            block=_blocks(on, lay, opt),
        )
        rsum[i], csum[i] = (empty if r is None else r), c
        rnorm[i] = empty if nrm is None else nrm
        wsum[i] = empty if w is None else w
        psq[i] = empty if ps is None else ps.reshape(1)
    # only what is partial crosses ranks: local statistics stay out of the collective
    send = [
        [x if (lay is not None and not lay.row_local) else empty for x, lay in zip(rsum, lays)],
        [x if (lay is not None and not lay.col_local) else empty for x, lay in zip(csum, lays)],
        [x if (lay is not None and not lay.col_local) else empty for x, lay in zip(rnorm, lays)],
        psq,
    ]  # wsum stays local: its sum of u^2 is partial like the others (added with them)
    red = ctx.reduce(send, list(views))
    for i, (lay, _) in ts.items():
        if not lay.row_local:
            rsum[i] = _own(red[0][i])
        if not lay.col_local:
            csum[i], rnorm[i] = _own(red[1][i]), _own(red[2][i])

    # ---- phase 2: the factored statistics that needed the sums; the update's sum of squares
    for i, (lay, t) in ts.items():
        inv, fi = aux[views[i].data.device]
        # with a local row statistic only small tensors: eager (a compiled call costs more)
        rf[i], cf[i], u2 = _call(
            precond_factored,
            runs_compiled(t["g"]) and not lay.row_local,
            None if lay.row_local else t["g"],
            t["r"],
            t["c"],
            None if lay.row_local else rsum[i],
            csum[i],
            rnorm[i] if lay.row_local else None,
            wsum[i] if lay.row_local and opt.clip else None,
            sc[i],
            inv,
            fi,
            dc=lay.dc,
            row_local=lay.row_local,
            opt=opt,
        )
        if u2 is not None:
            usq[i] = u2.reshape(1)
    usq_red = ctx.reduce([usq], list(views))[0] if opt.clip else None
    pre: list[Any] = [None] * n
    decay: list[Any] = [None] * n
    if rest:
        pre, decay = _scales(views, rest, sc, red[3] if opt.psq else None, usq_red, opt, lrs, aux)
        # a compiled call guards on its inputs' storage offsets: the factors it reads are copies
        own = list(ts) + [u[0][0] for u in units if len(u[0]) == 1 and runs_compiled(u[2]["p"])]
        for i in own:
            pre[i], decay[i] = _own(pre[i]), _own(decay[i])

    # ---- phase 3: the element-wise update (after the cautious mask's counts, with caution)
    agree: list[Tensor | None] = [None] * n
    phases = ("mask", "update") if opt.caution and opt.momentum else ("update",)
    for phase in phases:
        counts: list[Tensor] = [empty] * n
        for idx, rows, t in units:
            i = idx[0]
            inv, fi = aux[views[i].data.device]
            counts[i] = _call(
                apply_plain,
                runs_compiled(t["p"]),
                t["p"],
                t["g"],
                t["m"],
                t["v"],
                _per_row([pre[j] for j in idx], rows),
                _per_row([decay[j] for j in idx], rows),
                agree[i],  # with the mask, every unit is one tensor
                sc[i],
                inv,
                fi,
                opt=opt,
                phase=phase,
            )
        for i, (_, t) in ts.items():
            inv, fi = aux[views[i].data.device]
            counts[i] = _call(
                apply_factored,
                runs_compiled(t["p"]),
                t["p"],
                t["g"],
                t["m"],
                rf[i],
                cf[i],
                pre[i],
                decay[i],
                agree[i],
                sc[i],
                inv,
                fi,
                opt=opt,
                phase=phase,
            )
        if phase == "mask":
            agree = [
                _own(c.reshape(()))
                for c in ctx.reduce([[c.reshape(1) for c in counts]], list(views))[0]
            ]
    for dst, src in back:
        dst.copy_(src.view(dst.shape))
    for dsts, src in stacked:
        torch._foreach_copy_(dsts, list(src.view(len(dsts), *dsts[0].shape).unbind(0)))

    if found_inf is not None:  # a skipped step does not count
        for v in views:
            step = v.state.get("step")
            if isinstance(step, Tensor):
                step.sub_(found_inf.to(step.device, step.dtype))
    return lrs


def _scales(
    views: Sequence[ParamView],
    rest: list[int],
    sc: list[Tensor],
    psq: list[Tensor] | None,
    usq: list[Tensor] | None,
    opt: Options,
    lrs: list[Tensor | None],
    aux: dict[torch.device, tuple[Tensor | None, Tensor | None]],
) -> tuple[list[Any], list[Any]]:
    """:func:`~distopt.optim._factored.scales` of the phased tensors ``rest`` at once (their
    whole sums ``psq``/``usq`` indexed by view); writes their ``RMS`` state (kept where
    ``found_inf`` is set) and their lr into ``lrs``; returns per-view ``pre`` and ``decay``
    (0-dim views of one tensor: :func:`_own` them before a compiled call reads them)."""
    n = len(views)
    dev = views[0].data.device
    packs = torch.stack([sc[i] for i in rest])
    ps = None if psq is None else torch.cat([psq[i] for i in rest]).to(dev)
    us = None if usq is None else torch.cat([usq[i] for i in rest]).to(dev)
    pre_t, decay_t, rms, lr = scales(ps, us, packs, opt)
    if rms is not None:
        fi = aux[dev][1]
        olds = [views[i].state["RMS"] for i in rest]
        news = list(rms.unbind(0))
        if fi is not None:  # a step GradScaler skips keeps the last RMS
            news = [torch.where(fi > 0, o, x) for o, x in zip(olds, news)]
        torch._foreach_copy_(olds, news)
    pre: list[Any] = [None] * n
    decay: list[Any] = [None] * n
    for out, x in ((pre, pre_t), (decay, decay_t), (lrs, lr)):
        if x is not None:
            for i, y in zip(rest, x.unbind(0)):
                out[i] = y
    return pre, decay


def _rows(
    ts: list[Tensor],
    rows: int,
    cols: int,
    back: list[tuple[Tensor, Tensor]],
    stacked: list[tuple[list[Tensor], Tensor]] | None,
) -> Tensor:
    """Equal-shape tensors as one ``(len(ts) * rows, cols)`` tensor: a detached view of a single
    contiguous one (as :func:`_as5`), else a stacked copy, written back after the step when
    ``stacked`` is given (read-only inputs pass None)."""
    if len(ts) == 1:
        return _as5(ts[0], (rows, cols), back)
    out = torch.stack(ts).view(len(ts) * rows, cols)
    if stacked is not None:
        stacked.append((ts, out))
    return out


def _per_row(xs: list[Any], rows: int) -> Tensor | None:
    """Per-tensor factors (0-dim tensors, or None) of a unit: the one factor of a single tensor,
    else one ``(len(xs) * rows, 1)`` float32 column (stacks are float32: the same arithmetic
    as with each 0-dim factor)."""
    if xs[0] is None or len(xs) == 1:
        return xs[0]
    col = torch.stack(xs).to(torch.float32).view(len(xs), 1)
    return col if rows == 1 else col.expand(len(xs), rows).reshape(len(xs) * rows, 1)
