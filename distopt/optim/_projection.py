"""The projection step shared by AdamP and SGDP (Heo et al., 2021), written against shards.

For a parameter ``w`` with more than one dimension and a proposed update ``u`` the projection
removes the radial component of ``u`` (the part that only grows ``||w||``) when the gradient is
nearly orthogonal to the weights, which is the case for scale-invariant weights (those followed by
a normalisation layer).  Two views of ``w`` are tried in order:

* the *channel* view ``w.reshape(w.shape[0], -1)``: one vector per output channel (dim-0 row);
* the *layer* view: the whole tensor as one vector.

For the first view whose every vector satisfies ``|cos(g, w)| < delta / sqrt(vector length)``
(cosine with each norm clamped below at ``eps``), the update becomes
``u <- u - w_n * <w_n, u>`` with ``w_n = w / (||w|| + eps)`` per vector, and the weight decay of
that parameter is scaled by ``wd_ratio``.

Sharding: shards are dim-0 row slices, so every channel vector lives on one rank and channel
statistics are local; only the "every channel passes" test (a count of failing channels) and the
layer statistics need a sum across ranks.  All of them travel in **one** ``ctx.reduce`` call per
phase: the projection is phase 1; the optional cautious masking (``caution=True``, Liang et al.,
2024, and its spherical variant for projected parameters) needs the mean of its mask and is phase 2.

Single pass (no ``caution``), two reads of memory: the optimizer's rule, called with
``phase="rows"``, states ``u`` and returns :func:`projection_parts`, whose channel sums
``<p,p>``, ``<g,g>``, ``<p,g>``, ``<p,u>`` (:func:`distopt.optim._rule_rows.row_sums`) are all
the projection needs.  The update ``w <- w * decay(r) - step * (u - w * coef)`` has one
``coef`` per channel, i.e. ``w <- w * (decay(r) + step * coef) - step * u``:
:func:`channel_factors` computes that factor per channel on the device and
:func:`distopt.optim._rule_rows.update_rows` runs the rule's element-wise update on ``w *
factor``.  Parameters with one dimension are never projected: their update is the plain rule
through :func:`distopt.optim._kernel.apply`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _rule_rows as RR
from distopt.optim._core import ParamView, StepContext
from distopt.optim._functional import device_tensor

__all__ = [
    "project_",
    "projection_parts",
    "channel_factors",
    "local_factors",
    "factor_scalars",
    "projected_update",
    "ROW_STATS",
]

#: the per-channel sums of the projection, in :func:`row_sums`' order
ROW_STATS = ("pp", "gg", "pg", "pu")


def _rows(t: Tensor, view: ParamView) -> Tensor:
    """The local tensor as (local rows, channel length); works for empty shards."""
    length = math.prod(view.shape[1:])
    return t.reshape(t.shape[0] if t.dim() > 0 else 1, length)


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """Per-row inner products of two (rows, n) tensors without an (rows, n) temporary."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).reshape(x.shape[0])


def _rowsq(x: Tensor) -> Tensor:
    """Per-row sums of squares."""
    return torch.linalg.vector_norm(x, dim=1).square_()


def _project_rows_(u: Tensor, p2: Tensor, coef: Tensor) -> None:
    """``u <- u - p * coef`` with one coefficient per row (``coef = <p, u> / (||p|| + eps)^2``).

    ``u`` is the update tensor itself (never a reshaped copy), so the subtraction lands in place.
    """
    u.sub_((p2 * coef.unsqueeze(1)).reshape(u.shape))


def project_(
    ctx: StepContext,
    views: Sequence[ParamView],
    grads: Sequence[Tensor],
    updates: Sequence[Tensor],
    delta: float,
    wd_ratio: float,
    eps: float,
    caution: bool = False,
) -> list[float | Tensor]:
    """Project ``updates`` (fresh tensors, modified in place); return each weight-decay ratio.

    ``views[i].data`` holds the weights before this step's decay, ``grads[i]`` the gradient
    (not modified).  Returns ``wd_ratio`` for projected parameters and 1.0 for the others:
    floats when no parameter can be projected (all <= 1 dim), else 0-dim tensors (which view
    is projected, if any, is decided on the device: nothing is read back to the host).
    """
    n = len(views)
    ratios: list[float | Tensor] = [1.0] * n
    cand = [i for i, v in enumerate(views) if len(v.shape) > 1]
    if not cand and not caution:
        return ratios
    sharded = [v.sharded for v in views]

    # ---- phase 1: channel statistics (local rows) + layer partial sums, one reduction
    rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # i -> (<p,p>, <p,g>, <p,u>) per row
    stats: list[Tensor] = []
    for i, v in enumerate(views):
        if len(v.shape) <= 1:
            stats.append(v.data.new_zeros(0, dtype=torch.float32))
            continue
        p2, g2, u2 = _rows(v.data, v), _rows(grads[i], v), _rows(updates[i], v)
        pp, gg = _rowsq(p2), _rowsq(g2)
        pg, pu = _rowdot(p2, g2), _rowdot(p2, u2)
        rows[i] = (pp, pg, pu)
        cos = pg.abs() / (gg.sqrt().clamp_min(eps) * pp.sqrt().clamp_min(eps))
        # a channel "fails" unless cos < threshold (a NaN fails, as max() would propagate it)
        fails = (~(cos < delta / math.sqrt(p2.shape[1]))).sum()
        stats.append(torch.stack([fails.float(), pg.sum(), gg.sum(), pp.sum(), pu.sum()]).float())
    table: dict[int, Tensor] = {}  # i -> reduced [fails, <p,g>, <g,g>, <p,p>, <p,u>] (float64)
    if cand:
        (stats,) = ctx.reduce([stats], sharded)
        # The decisions stay on the device (no host read): float64 where the device has it, so
        # the thresholds and coefficients are the values the host computation would give.
        wide = torch.float32 if stats[cand[0]].device.type == "mps" else torch.float64
        table = {i: stats[i].to(wide) for i in cand}
        one = torch.ones((), dtype=wide, device=stats[cand[0]].device)
        ratios = [one] * n  # all tensors (one _foreach_mul_ of the decay takes them together)
    channel: dict[int, Tensor] = {}  # i -> projected by channel (0-dim bool)
    layer: dict[int, Tensor] = {}  # i -> projected as one vector
    for i, t in table.items():
        v = views[i]
        fails, pg, gg, pp, pu = t.unbind(0)
        ch = fails == 0
        cos = pg.abs() / (gg.sqrt().clamp_min(eps) * pp.sqrt().clamp_min(eps))
        ly = ~ch & (cos < delta / math.sqrt(v.numel))
        r_pp, _, r_pu = rows[i]
        d = r_pp.sqrt() + eps
        coef = torch.where(ch, r_pu / (d * d), torch.zeros_like(r_pu))
        _project_rows_(updates[i], _rows(v.data, v), coef)
        dl = pp.sqrt() + eps
        coef_l = torch.where(ly, pu / (dl * dl), torch.zeros_like(pu))
        updates[i].sub_(v.data * coef_l.to(v.data.dtype))
        channel[i], layer[i] = ch, ly
        ratios[i] = torch.where(ch | ly, wd_ratio, 1.0).to(t.dtype)  # type: ignore[call-overload]
    if not caution:
        return ratios

    # ---- phase 2 (caution): mask mean (whole tensor) and the re-projection's inner products
    masks: list[Tensor] = []
    stats2: list[Tensor] = []
    for i, v in enumerate(views):
        g, u = grads[i], updates[i]
        if i not in table:
            mask = (u * g > 0).to(g.dtype)
            stats2.append(torch.stack([mask.sum(), mask.new_zeros(())]).float())
        else:
            p2 = _rows(v.data, v)
            r_pp, r_pg, _ = rows[i]
            d = r_pp.sqrt() + eps
            pg, pp = table[i][1], table[i][3]
            per_row = torch.where(
                channel[i],
                r_pg / (d * d),
                torch.where(layer[i], pg / (pp.sqrt() + eps) ** 2, 0.0).to(r_pg.dtype),
            )
            radial = p2 * per_row.unsqueeze(1)
            mask = (u * (g - radial.reshape(g.shape)) > 0).to(g.dtype)
            pum = (v.data * u * mask).sum()
            stats2.append(torch.stack([mask.sum(), pum]).float())
        masks.append(mask)
    (stats2,) = ctx.reduce([stats2], sharded)
    sums = torch.stack(stats2)
    sums = sums.to(torch.float32 if sums.device.type == "mps" else torch.float64)
    numels = device_tensor([float(max(v.numel, 1)) for v in views], sums.dtype, sums.device)
    scales = 1.0 / (sums[:, 0] / numels).clamp_min(1e-3)
    torch._foreach_mul_(list(updates), masks)
    torch._foreach_mul_(list(updates), list(scales.to(updates[0].dtype).unbind(0)))
    for i in table:  # remove the radial part the masking brought back
        v = views[i]
        p2, u2 = _rows(v.data, v), _rows(updates[i], v)
        r_pp = rows[i][0]
        d = r_pp.sqrt() + eps
        coef = _rowdot(p2, u2) / (d * d)
        _project_rows_(updates[i], p2, torch.where(channel[i], coef, torch.zeros_like(coef)))
        pp = table[i][3]
        coef_l = torch.where(layer[i], sums[i, 1] * scales[i] / (pp.sqrt() + eps) ** 2, 0.0)
        updates[i].sub_(v.data * coef_l.to(v.data.dtype))
    return ratios


# --------------------------------------------------------------------------- single pass


def projection_parts(p: Tensor, g: Tensor, u: Tensor) -> dict[str, Tensor]:
    """``phase="rows"`` of a projected rule: the products whose channel sums (:data:`ROW_STATS`,
    by :func:`distopt.optim._rule_rows.row_sums`) decide and shape the projection."""
    return {"pp": p * p, "gg": g * g, "pg": p * g, "pu": p * u}


def channel_factors(
    ctx: StepContext,
    views: Sequence[ParamView],
    stats: Sequence[Tensor],
    *,
    delta: float,
    wd_ratio: float,
    eps: float,
    rates: Sequence[float],
    steps: Sequence[float],
) -> list[Tensor]:
    """Decide each view's projection from its channel sums ``stats`` (:data:`ROW_STATS` per
    local row) and return, per local row, the factor that folds the projection and the decided
    weight decay into the weights: ``1 - rate * r + step * coef_c`` (``r``: ``wd_ratio`` when
    projected, else 1; ``coef_c``: ``<w_c, u_c> / (||w_c|| + eps)^2`` for the channel view, the
    layer's for the layer view, 0 when not projected), so that ``w * factor - step * u`` is the
    projected, decayed step.

    ``views`` have more than one dimension; ``rates[i]`` is the decay per unit ratio
    (``lr * weight_decay`` for AdamP, 0 without decay), ``steps[i]`` the multiplier of ``u`` in
    the update.  The decisions stay on the device (one :meth:`StepContext.reduce` for the
    layer sums and the count of failing channels).  :func:`local_factors` is the same decision
    for one unsharded tensor inside a compiled kernel.
    """
    if not views:
        return []
    dev = stats[0].device
    rows = [st.shape[1] for st in stats]
    # float64 where the device has it: the thresholds and coefficients the host would compute
    wide = torch.float32 if dev.type == "mps" else torch.float64
    seg = _segments(rows, dev)  # view index of every row: all views in a few batched ops
    per_view = [
        [delta / math.sqrt(math.prod(v.shape[1:])) for v in views],
        [delta / math.sqrt(v.numel) for v in views],
        list(rates),
        list(steps),
    ]
    thr_c, thr_l, rate, step = device_tensor(sum(per_view, []), wide, dev).view(4, -1).unbind(0)
    s_rows = torch.cat(list(stats), dim=1) if len(stats) > 1 else stats[0]
    parts = _channel_parts(s_rows, thr_c.to(s_rows.dtype)[seg], eps, wide)
    partial = torch.zeros(len(views), 5, dtype=wide, device=dev).index_add_(0, seg, parts)
    (totals,) = ctx.reduce([list(partial.unbind(0))], list(views))
    ch, coef_l, decay = _view_decision(torch.stack(totals), thr_l, rate, wd_ratio, eps)
    factors = _row_factors(s_rows, wide, ch[seg], coef_l[seg], decay[seg], step[seg], eps)
    return list(factors.split(rows))


def projected_update(
    opt: Any,
    ctx: StepContext,
    rule: Callable[..., Any],
    views: Sequence[ParamView],
    states: Sequence[str],
    scalars: Sequence[dict[str, float]],
    *,
    delta: float,
    wd_ratio: float,
    eps: float,
    rates: Sequence[float],
    steps: Sequence[float],
    **options: Any,
) -> None:
    """The projected step of ``views`` (more than one dimension) with ``rule`` (AdamP's or
    SGDP's, see :func:`channel_factors` for ``rates`` / ``steps``): unsharded views under
    compiled kernels in one kernel per tensor (``u`` computed once for a rule with ``u_once``:
    :func:`~distopt.optim._rule_rows.fused_update` with :func:`local_factors`), the others in
    three steps: channel sums
    (:func:`~distopt.optim._rule_rows.row_sums`), :func:`channel_factors` (one reduction
    across ranks) and :func:`~distopt.optim._rule_rows.update_rows`."""
    views, scalars = list(views), list(scalars)
    if RR.fusable(views):
        layout = [_layer_rows(v) for v in views]
        # one mapping per distinct (scalars, shape, layout, rate, step): views of one shape
        # share it, and fused_update packs each mapping once
        merged: dict[tuple, dict[str, float]] = {}
        fused = []
        for v, sc, r, t, rows in zip(views, scalars, rates, steps, layout):
            k = (id(sc), v.shape, rows, r, t)
            m = merged.get(k)
            if m is None:
                m = merged[k] = {
                    **sc,
                    **factor_scalars(v, delta=delta, wd_ratio=wd_ratio, eps=eps, rate=r, step=t),
                    **({} if rows is None else {"p_thr_c": -1.0}),  # no channel test: layer only
                }
            fused.append(m)
        rest = RR.fused_update(
            opt, rule, views, states, fused, local_factors, ROW_STATS, layout=layout, **options
        )
        if not rest:
            return
        views, scalars = [views[i] for i in rest], [scalars[i] for i in rest]
        rates, steps = [rates[i] for i in rest], [steps[i] for i in rest]
    stats = RR.row_sums(opt, rule, views, states, scalars, ROW_STATS, **options)
    factors = channel_factors(
        ctx, views, stats, delta=delta, wd_ratio=wd_ratio, eps=eps, rates=rates, steps=steps
    )
    RR.update_rows(opt, rule, views, states, scalars, factors, **options)


def _layer_rows(view: ParamView) -> int | None:
    """For an unsharded tensor of one row (a class token, a position embedding): a row count
    ``r >= 2`` to regroup its elements by in the one-kernel form, else ``None``.

    Its one channel is the whole tensor, with the layer's threshold, so "projected by channel"
    and "projected as one vector" are the same decision and coefficient: regrouped into ``r``
    rows, with the channel test made to fail (``p_thr_c = -1``), the layer projection (from the
    rows' sums added) gives its step.  So one compiled kernel serves every tensor:
    ``torch.compile`` specialises a dimension of size 1 (a second kernel, seconds of the first
    step) and inductor's float32 row sums over more than 4096 columns take another form (a
    third), which the chosen ``r`` avoids where a divisor allows.
    """
    if view.sharded or RR.local_rows(view) != 1:
        return None
    return _split(view.data.numel())


@functools.lru_cache(maxsize=256)
def _split(n: int) -> int | None:
    """The least ``r >= 2`` dividing ``n`` with ``n / r <= 4096`` (else the least dividing
    ``r >= 2``) that leaves at least 2 columns; ``None`` when there is none (``n`` prime or
    under 4).  Tried over a bounded range (a cached answer per size)."""
    lo = max(2, -(-n // 4096))
    for r in range(lo, min(n // 2, lo + 4096) + 1):
        if n % r == 0:
            return r
    for r in range(2, min(lo, n // 2 + 1)):
        if n % r == 0:
            return r
    return None


def local_factors(stats: Tensor, s: dict[str, Tensor]) -> Tensor:
    """:func:`channel_factors` for one unsharded tensor, from its channel sums ``stats``
    (:data:`ROW_STATS` by local row) and the scalars of :func:`factor_scalars` in ``s``: the
    same decision, written as tensor ops for a compiled kernel (no segments, no reduction
    across ranks: the tensor's rows are all here)."""
    wide = s["p_eps"].dtype
    parts = _channel_parts(stats, s["p_thr_c"].to(stats.dtype), s["p_eps"], wide)
    ch, coef_l, decay = _view_decision(
        parts.sum(0), s["p_thr_l"], s["p_rate"], s["p_wd_ratio"], s["p_eps"]
    )
    return _row_factors(stats, wide, ch, coef_l, decay, s["p_step"], s["p_eps"])


def factor_scalars(
    view: ParamView, *, delta: float, wd_ratio: float, eps: float, rate: float, step: float
) -> dict[str, float]:
    """The host scalars :func:`local_factors` reads for ``view`` (its thresholds, decay and
    step, the projection's ``wd_ratio`` and ``eps``)."""
    return {
        "p_thr_c": delta / math.sqrt(math.prod(view.shape[1:])),
        "p_thr_l": delta / math.sqrt(view.numel),
        "p_rate": rate,
        "p_step": step,
        "p_wd_ratio": wd_ratio,
        "p_eps": eps,
    }


def _channel_parts(stats: Tensor, thr_c: Tensor, eps: float | Tensor, wide: torch.dtype) -> Tensor:
    """Per row ``[fails, <p,g>, <g,g>, <p,p>, <p,u>]`` (``wide``): a channel "fails" unless
    ``|cos(g, w)| < thr_c`` (a NaN fails, as ``max()`` would propagate it)."""
    pp, gg, pg, pu = stats.unbind(0)
    cos = pg.abs() / (gg.sqrt().clamp_min(eps) * pp.sqrt().clamp_min(eps))
    fails = ~(cos < thr_c)
    return torch.stack([fails.to(stats.dtype), pg, gg, pp, pu], dim=1).to(wide)


def _view_decision(
    totals: Tensor, thr_l: Tensor, rate: Tensor, wd_ratio: float | Tensor, eps: float | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """From a view's summed ``[fails, <p,g>, <g,g>, <p,p>, <p,u>]`` (last dim): projected by
    channel (no channel fails), the layer coefficient (0 unless projected as one vector) and
    the weight-decay factor ``1 - rate * r``."""
    n_fail, pg_l, gg_l, pp_l, pu_l = totals.unbind(-1)
    ch = n_fail == 0
    cos_l = pg_l.abs() / (gg_l.sqrt().clamp_min(eps) * pp_l.sqrt().clamp_min(eps))
    ly = ~ch & (cos_l < thr_l)
    dl = pp_l.sqrt() + eps
    coef_l = torch.where(ly, pu_l / (dl * dl), 0.0)
    decay = 1.0 - rate * torch.where(ch | ly, wd_ratio, 1.0)
    return ch, coef_l, decay


def _row_factors(
    stats: Tensor,
    wide: torch.dtype,
    ch: Tensor,
    coef_l: Tensor,
    decay: Tensor,
    step: Tensor,
    eps: float | Tensor,
) -> Tensor:
    """Per row ``decay + step * coef`` (``coef``: the channel's ``<w_c, u_c> / (||w_c|| +
    eps)^2`` where projected by channel, else the layer coefficient)."""
    pp, pu = stats[0].to(wide), stats[3].to(wide)
    d = pp.sqrt() + eps
    return decay + step * torch.where(ch, pu / (d * d), coef_l)


_SEGMENTS: dict[tuple, Tensor] = {}


def _segments(rows: list[int], device: torch.device) -> Tensor:
    """``[0] * rows[0] + [1] * rows[1] + ...`` on ``device`` (cached per layout)."""
    key = (tuple(rows), device)
    seg = _SEGMENTS.get(key)
    if seg is None:
        if len(_SEGMENTS) > 64:
            _SEGMENTS.clear()
        counts = torch.tensor(rows, dtype=torch.int64)
        seg = torch.repeat_interleave(torch.arange(len(rows)), counts).to(device)
        _SEGMENTS[key] = seg
    return seg
