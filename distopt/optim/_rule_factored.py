"""Factored second moments in few passes: the per-tensor maths of Adafactor and AdafactorBigVision.

Both optimizers keep, for a tensor factored over dims ``(dc, dr)``, a row statistic ``R`` (the
mean of ``g^2 + eps`` over ``dr``) and a column statistic ``C`` (the mean over ``dc``), and
precondition with ``u = g / sqrt((R / mean_dc(R)) outer C)``; unfactored tensors keep the whole
``V`` and use ``u = g / sqrt(V)``.  Every tensor is seen through a 5-D view ``(P, N_lo, M, N_hi,
S)`` with ``(lo, hi) = sorted((dc, dr))`` in positions 1 and 3, so one function serves every
factoring (last two dims, dims (0, 1) of a convolution kernel, the two largest dims).

A step is three per-tensor phases, each a pure function stated once here, run compiled
(``torch.compile(dynamic=True, fullgraph=True)``, one kernel per phase and option set) or eagerly
under the same switch as :mod:`distopt.optim._kernel` (``DISTOPT_KERNELS`` / ``_kernel.mode()``):

1. ``stats``: reads ``g`` (and ``p`` for the parameter RMS): the row and column sums of
   ``g^2``, the row statistic when it is local, the sum over ``dc`` of the new row statistic and
   then the column sums of ``g^2 / R`` (the update's RMS, see :func:`stats_factored`); for an
   unfactored tensor the new ``V`` (written) and the sum of ``u^2``.
2. ``precond`` (factored only): after the partial sums are added across ranks, the statistics
   that needed them, the row and column factors of the preconditioner (small tensors, computed
   once: the update does not recompute them per element) and the sum of ``u^2``: from the
   weighted column sums with a local row statistic (then only small tensors, run eagerly), else
   one read of ``g`` (none without clipping).
3. ``apply``: the element-wise update of ``p`` and the first moment (read ``p``, ``g``, ``m``;
   write ``p``, ``m``), with an extra ``mask`` phase before it for the cautious mask's count.

Between phases the optimizer adds the partial sums across ranks (one :meth:`StepContext.reduce`
per phase and param group) and computes the per-tensor scale factors on the device (no host
reads).  ``torch.amp.GradScaler``: the gradient is multiplied by ``1 / grad_scale`` inside each
phase and every written value is kept where ``found_inf`` is set (see :mod:`._kernel`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from distopt.optim import _kernel as K
from distopt.optim._core import ParamView, StepContext
from distopt.optim._functional import device_tensor

__all__ = ["Layout", "layout", "Options", "pack", "run", "SC"]

log = logging.getLogger(__name__)

#: positions in each tensor's float64 scalar pack
SC = {
    "w2": 0,
    "b2": 1,
    "eps": 2,
    "n_r": 3,
    "n_c": 4,
    "b1": 5,
    "w1": 6,
    "lr": 7,
    "decay": 8,
    "numel": 9,
}


def pack(**values: float) -> list[float]:
    """A tensor's host scalars in :data:`SC` order (names not given are 0)."""
    unknown = set(values) - set(SC)
    if unknown:
        raise ValueError(f"pack: unknown scalar names {sorted(unknown)}; known: {sorted(SC)}")
    out = [0.0] * len(SC)
    for k, x in values.items():
        out[SC[k]] = float(x)
    return out


class Layout(NamedTuple):
    """How one (local) tensor is factored: its 5-D view and where its statistics live."""

    shape5: tuple[int, int, int, int, int]
    dc: int  # 1 or 3: the dim the column statistic is the mean over
    dr: int  # 3 or 1: the dim the row statistic is the mean over
    row_local: bool  # the row statistic is complete on this rank (dr is not the sharded dim 0)
    col_local: bool  # likewise the column statistic and the row normaliser (dc is not dim 0)


def layout(
    local_shape: torch.Size, dims: tuple[int, int] | None, sharded: bool = True
) -> Layout | None:
    """The :class:`Layout` of a tensor of ``local_shape`` factored over ``dims = (dc, dr)``;
    ``sharded``: whether dim 0 holds this rank's rows of a larger tensor (else every statistic
    is local)."""
    if dims is None:
        return None
    dc, dr = dims
    lo, hi = sorted(dims)
    s = tuple(local_shape)
    shape5 = (math.prod(s[:lo]), s[lo], math.prod(s[lo + 1 : hi]), s[hi], math.prod(s[hi + 1 :]))
    row_local, col_local = dr != 0 or not sharded, dc != 0 or not sharded
    return Layout(shape5, 1 if dc < dr else 3, 3 if dc < dr else 1, row_local, col_local)  # type: ignore[arg-type]


class Options(NamedTuple):
    """Static options of one kernel (hashable; each distinct set compiles its own kernels)."""

    flavour: str  # "hf": transformers/timm Adafactor; "bv": Big Vision
    psq: bool  # phase 1 also sums p^2 (the parameter RMS)
    clip: bool  # the update RMS is needed (phase 2 / phase 1 sum u^2)
    momentum: bool
    caution: bool
    decay: bool  # weight decay multiplies p


# --------------------------------------------------------------------------- the maths


def _ema(old: Tensor, new: Tensor, sc: Tensor, flavour: str) -> Tensor:
    """The second-moment average: ``b2 * old + w2 * new`` (transformers' ``mul_``/``add_``), or
    Big Vision's ``lerp(old, new, w2)``."""
    if flavour == "bv":
        return torch.lerp(old, new, sc[SC["w2"]].to(old.dtype))
    return old * sc[SC["b2"]] + new * sc[SC["w2"]]


def _grad(g: Tensor, inv: Tensor | None) -> Tensor:
    return g if inv is None else g * inv


def _factors(row: Tensor, col: Tensor, rnorm: Tensor, sc: Tensor) -> tuple[Tensor, Tensor]:
    """The row and column factors of ``1 / sqrt((R / mean_dc(R)) outer C)`` (``rnorm``: the sum
    of ``R`` over ``dc``); small tensors, realised once (not recomputed per element)."""
    return torch.rsqrt(row / (rnorm / sc[SC["n_c"]])), torch.rsqrt(col)


def _direction(
    u: Tensor, m: Tensor | None, pre: Tensor | None, sc: Tensor, opt: Options
) -> tuple[Tensor, Tensor | None]:
    """From the preconditioned gradient ``u`` to the update direction and the new first moment.

    ``pre``: transformers' ``lr / clip`` (multiplied before the momentum), or Big Vision's clip
    divisor (None: no clipping)."""
    if opt.flavour == "bv":
        if pre is not None:
            u = u / pre
    else:
        u = u * pre
    if not opt.momentum:
        return u, None
    if opt.flavour == "bv":  # kept in momentum_dtype (rounded as `m.lerp_(u.to(m.dtype), w1)`)
        m_new = torch.lerp(m.float(), u.to(m.dtype).float(), sc[SC["w1"]].float()).to(m.dtype)
        return m_new.to(u.dtype), m_new
    m_new = m * sc[SC["b1"]] + u * sc[SC["w1"]]
    return m_new, m_new


def _total(x: Tensor) -> Tensor:
    """The sum of a 5-D ``x``: over dim 3 first (kept), then the rest: the first sum has the
    loop of the row or column sums over dim 3 (a whole-tensor sum is a loop with a slower
    compensated accumulator: ~1.5x the time on a CPU)."""
    return x.sum(dim=3, keepdim=True).sum()


def _mask(d: Tensor, g: Tensor) -> Tensor:
    """The cautious mask (arXiv:2411.16085): where the direction and the gradient agree in sign."""
    return (d * g > 0).to(d.dtype)


def _finish(p, g, u, m, pre, decay, agree, sc, fi, opt: Options, phase: str):
    """The element-wise end of phase 3: ``phase="mask"`` returns the cautious mask's count;
    ``"update"`` writes the new parameter and first moment.  ``decay``: the factor ``p`` is
    multiplied by (a tensor for transformers, whose lr may depend on the parameter RMS; from the
    scalar pack for Big Vision); ``agree``: the mask's count over the whole tensor."""
    d, m_new = _direction(u, m, pre, sc, opt)
    if phase == "mask":
        return _mask(d, g).sum(dtype=torch.float32)
    if agree is not None:
        d = d * (_mask(d, g) / torch.clamp(agree / sc[SC["numel"]], min=1e-3))
    kept = p
    if opt.flavour == "bv":
        d = d * sc[SC["lr"]]
        if opt.decay:
            kept = p * sc[SC["decay"]]
    elif opt.decay:
        kept = p * decay
    K._store([(p, kept - d)] + ([] if m_new is None else [(m, m_new)]), fi)
    return None


def stats_factored(p, g, row, sc, inv, fi, *, dc: int, dr: int, row_local: bool, opt: Options):
    """Phase 1 of a factored tensor: returns (row sums of g^2 or None, column sums of g^2, sum
    over dc of the new row statistic or None, column sums of ``g^2 / R`` or None, sum of p^2 or
    None); writes the local row statistic.

    ``sum(u^2) = sum_ij g_ij^2 mean_dc(R) / (R_i C_j) = mean_dc(R) sum_j (sum_i g_ij^2 / R_i) / C_j``:
    with a local row statistic ``R``, the column sums of ``g^2 / R`` (the same loop as those of
    ``g^2``) give the update's RMS without another read of ``g`` (over local rows: the partial
    sum of ``u^2`` that the reduction of the update sums completes)."""
    g = _grad(g, inv)
    gsq = g * g
    csum = gsq.sum(dim=dc, keepdim=True)
    rsum = gsq.sum(dim=dr, keepdim=True)
    psq = _total(p * p) if opt.psq else None
    if not row_local:
        return rsum, csum, None, None, psq
    new_row = _ema(row, rsum / sc[SC["n_r"]] + sc[SC["eps"]], sc, opt.flavour)
    K._store([(row, new_row)], fi)
    wsum = (gsq / new_row).sum(dim=dc, keepdim=True) if opt.clip else None
    return None, csum, new_row.sum(dim=dc, keepdim=True), wsum, psq


def precond_factored(
    g, row, col, rsum, csum, rnorm, wsum, sc, inv, fi, *, dc: int, row_local: bool, opt: Options
):
    """Phase 2 of a factored tensor (the partial sums now whole): the column statistic and, when
    it needed the reduction, the row statistic; returns the row and column factors and the sum
    of ``u^2`` (or None): from ``wsum`` (see :func:`stats_factored`) with a local row statistic,
    else one read of ``g`` (``g`` is None with a local row statistic)."""
    new_col = _ema(col, csum / sc[SC["n_c"]] + sc[SC["eps"]], sc, opt.flavour)
    K._store([(col, new_col)], fi)
    if row_local:
        new_row = row
    else:
        new_row = _ema(row, rsum / sc[SC["n_r"]] + sc[SC["eps"]], sc, opt.flavour)
        K._store([(row, new_row)], fi)
        rnorm = new_row.sum(dim=dc, keepdim=True)
    r_factor, c_factor = _factors(new_row, new_col, rnorm, sc)
    if not opt.clip:
        return r_factor, c_factor, None
    if row_local:
        return r_factor, c_factor, _total((rnorm / sc[SC["n_c"]]) * (wsum / new_col))
    u = (r_factor * c_factor) * _grad(g, inv)
    return r_factor, c_factor, _total(u * u)


def apply_factored(
    p, g, m, r_factor, c_factor, pre, decay, agree, sc, inv, fi, *, opt: Options, phase: str
):
    """Phase 3 of a factored tensor: writes p and the first moment (``phase="mask"``: returns the
    cautious mask's count instead)."""
    g = _grad(g, inv)
    return _finish(p, g, (r_factor * c_factor) * g, m, pre, decay, agree, sc, fi, opt, phase)


def stats_plain(p, g, v, sc, inv, fi, *, opt: Options):
    """Phase 1 of unfactored tensors, seen as ``(rows, cols)`` (one tensor's rows, or equal
    tensors stacked): writes ``V``; returns the row sums of p^2 and of u^2 (or None)."""
    g = _grad(g, inv)
    new_v = _ema(v, g * g + sc[SC["eps"]], sc, opt.flavour)
    K._store([(v, new_v)], fi)
    psq = (p * p).sum(dim=-1) if opt.psq else None
    if not opt.clip:
        return psq, None
    u = torch.rsqrt(new_v) * g
    return psq, (u * u).sum(dim=-1)


def apply_plain(p, g, m, v, pre, decay, agree, sc, inv, fi, *, opt: Options, phase: str):
    """Phase 3 of unfactored tensors (as :func:`apply_factored`; ``(rows, cols)`` as
    :func:`stats_plain`, a stack only without the cautious mask, whose count is per tensor)."""
    g = _grad(g, inv)
    return _finish(p, g, torch.rsqrt(v) * g, m, pre, decay, agree, sc, fi, opt, phase)


# --------------------------------------------------------------------------- the runner

#: in compile mode, a call on fewer elements runs eagerly: a compiled call's fixed cost (guards,
#: wrappers: ~50-100 us on a CPU) is more than the eager ops on it, and small tensors' degenerate
#: shapes (size-1 dims, which dynamic shapes specialise) would each compile a phase again
EAGER_BELOW = 1 << 15  # ViT-S: the stacks of its biases and norms (75 x 384, 12 x 1536) too

_kernels: dict[Any, Callable[..., Any]] = {}
_failed: set[Any] = set()


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
        if compiled:  # the backend and inductor options of _kernel's kernels
            backend = K.BACKEND
            options = K.COMPILE_OPTIONS if backend == "inductor" else None
            k = torch.compile(k, dynamic=True, fullgraph=True, backend=backend, options=options)
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


#: ``scales(psq, usq) -> (pre, decay)``: the optimizer's per-tensor factors (device tensors or
#: None) from the whole-tensor sums of ``p^2`` and ``u^2`` (lists of 0-dim tensors, or None)
Scales = Callable[[list[Tensor] | None, list[Tensor] | None], tuple[list[Any], list[Any]]]


def run(
    owner: Any,
    views: Sequence[ParamView],
    lays: Sequence[Layout | None],
    packs: Sequence[Sequence[float]],
    ctx: StepContext,
    opt: Options,
    scales: Scales,
    *,
    state_names: tuple[str, str, str],
) -> None:
    """One step of a param group: ``views`` with their :class:`Layout` (None: unfactored), the
    host scalars of each (``packs[i][SC[name]]``), the reductions through ``ctx``.

    ``state_names``: the names of the row, column and unfactored second moments; the first
    moment is ``exp_avg``.  ``owner``: the optimizer (its ``GradScaler`` attributes).

    Unfactored tensors of one shape, dtype and scalar pack (the biases and norm weights of a
    network) are stacked into one ``(rows, cols)`` call per phase (without the cautious mask);
    in compile mode, calls on fewer than :data:`EAGER_BELOW` elements run eagerly.
    """
    if not views:
        return
    grad_scale, found_inf = K.scaler_of(owner)
    compiled = K.mode() == "compile" and K._can_compile(views[0].data.device)
    kr, kc, kv = state_names
    n = len(views)
    # one scalar tensor per distinct set of values (tensors of one shape share theirs); each its
    # own storage: a row of a shared pack would have a storage offset the kernels guard on
    sc: list[Tensor] = []
    made: dict[tuple, Tensor] = {}
    aux: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}
    for v, values in zip(views, packs):
        dev = v.data.device
        key = (tuple(float(x) for x in values), dev)
        if key not in made:
            made[key] = device_tensor(key[0], torch.float64, dev)  # no stream sync
        sc.append(made[key])
        if dev not in aux:
            inv = None if grad_scale is None else grad_scale.to(dev, torch.float32).reciprocal()
            fi = None if found_inf is None else found_inf.to(dev, torch.float32)
            aux[dev] = (inv, fi)

    back: list[tuple[Tensor, Tensor]] = []
    stacked: list[tuple[list[Tensor], Tensor]] = []
    ts: dict[int, tuple[Layout, dict[str, Tensor | None]]] = {}
    plain: dict[tuple, list[int]] = {}
    for i, (v, lay) in enumerate(zip(views, lays)):
        m = v.state.get("exp_avg") if opt.momentum else None
        if lay is None:
            d = v.data
            stackable = not opt.caution and d.dtype == torch.float32
            key = (tuple(d.shape), d.device, id(sc[i]), None if m is None else m.dtype)
            plain.setdefault(key if stackable else (i,), []).append(i)
            continue
        s5 = lay.shape5
        ts[i] = (
            lay,
            {
                "p": _as5(v.data, s5, back),
                "g": _as5(v.grad, s5, back),
                "m": None if m is None else _as5(m, s5, back),
                "r": _as5(v.state[kr], _with(s5, d=lay.dr), back),
                "c": _as5(v.state[kc], _with(s5, d=lay.dc), back),
            },
        )
    # unfactored units: (view indices, rows per tensor, tensors as (rows, cols))
    units: list[tuple[list[int], int, dict[str, Tensor | None]]] = []
    for idx in plain.values():
        shape = views[idx[0]].data.shape
        numel = math.prod(shape)
        cols = shape[-1] if shape and numel else 1
        rows = numel // cols
        group = [views[i] for i in idx]
        tensors: dict[str, Tensor | None] = {
            "p": _rows([v.data for v in group], rows, cols, back, stacked),
            "g": _rows([v.grad for v in group], rows, cols, back, None),
            "v": _rows([v.state[kv] for v in group], rows, cols, back, stacked),
            "m": None,
        }
        if opt.momentum:
            tensors["m"] = _rows([v.state["exp_avg"] for v in group], rows, cols, back, stacked)
        units.append((idx, rows, tensors))

    def runs_compiled(t: Tensor) -> bool:
        return compiled and t.numel() >= EAGER_BELOW

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
        r, c, nrm, w, ps = _call(
            stats_factored,
            runs_compiled(t["p"]),
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
    for i, lay in enumerate(lays):
        if lay is None:
            continue
        if not lay.row_local:
            rsum[i] = _own(red[0][i])
        if not lay.col_local:
            csum[i], rnorm[i] = _own(red[1][i]), _own(red[2][i])
    psq_red = red[3] if opt.psq else None

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
    pre, decay = scales(psq_red, usq_red)
    pre, decay = [_own(x) for x in pre], [_own(x) for x in decay]

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
