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

Single pass (no ``caution``): :func:`row_sums` reads the parameter, gradient and state once and
returns each channel's ``<p,p>``, ``<g,g>``, ``<p,g>`` and ``<p,u>`` (the optimizer's rule,
called with ``phase="rows"``, states ``u`` and returns :func:`projection_parts`; one compiled
reduction kernel per rule, as :mod:`distopt.optim._kernel` compiles the update).  The update is
then ``w <- w * decay(r) - step * (u - w * coef)`` with one ``coef`` per channel, i.e.
``w <- w * (decay(r) + step * coef) - step * u``: :func:`prescale_` multiplies each channel of
``w`` by its factor (the projection and the decided weight decay in one in-place pass) and the
rule's element-wise update, run by :func:`distopt.optim._kernel.apply`, does the rest.
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
from distopt.optim._core import ParamView, StepContext
from distopt.optim._functional import device_tensor

__all__ = ["project_", "projection_parts", "row_sums", "prescale_", "ROW_STATS"]

log = logging.getLogger(__name__)

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
    """``phase="rows"`` of a projected rule: the products :func:`row_sums` adds per channel."""
    return {"pp": p * p, "gg": g * g, "pg": p * g, "pu": p * u}


_row_kernels: dict[Any, Callable[..., Tensor]] = {}
_row_failed: set[Any] = set()


def _row_kernel(key: tuple, compiled: bool) -> Callable[..., Tensor]:
    fn = _row_kernels.get((key, compiled))
    if fn is not None:
        return fn
    rule, states, names, options = key
    opts = dict(options)

    def rows(
        p: Tensor, g: Tensor, sts: tuple[Tensor, ...], sc: Tensor, inv: Tensor | None
    ) -> Tensor:
        if inv is not None:
            g = g * inv
        parts = rule(
            p, g, dict(zip(states, sts)), dict(zip(names, sc.unbind(0))), phase="rows", **opts
        )
        return torch.stack([parts[k].sum(dim=1, dtype=torch.float32) for k in ROW_STATS])

    # one code object per rule: torch.compile's caches and recompile limit are per code object
    code = rows.__code__.replace(co_name=f"distopt_{rule.__name__}_rows")
    fn = types.FunctionType(
        code, rows.__globals__, code.co_name, rows.__defaults__, rows.__closure__
    )
    if compiled:
        fn = torch.compile(fn, dynamic=True, fullgraph=True)
    _row_kernels[(key, compiled)] = fn
    return fn


def _as_rows(t: Tensor, rows: int, cols: int) -> Tensor:
    """``t`` as (rows, cols); detached so that ``torch.compile`` does not guard on the base's
    rank (a view of a 4-d weight would otherwise compile the kernel again)."""
    return t.reshape(rows, cols).detach()


def row_sums(
    opt: Any,
    rule: Callable[..., Any],
    views: Sequence[ParamView],
    states: Sequence[str],
    scalars: Sequence[Mapping[str, float]],
    **options: Any,
) -> list[Tensor]:
    """Per channel (local dim-0 row) of each view, the sums :data:`ROW_STATS` of
    ``rule(..., phase="rows")`` (which returns :func:`projection_parts`): one ``(4, local rows)``
    float32 tensor per view, from one read of the parameter, gradient and ``states``.

    ``scalars``: one mapping of host floats per view (the rule's ``s``); ``options``: the rule's
    static keywords.  Compiled like :func:`distopt.optim._kernel.apply`'s kernels (same mode
    switch); the gradient is divided by ``GradScaler``'s scale as there.
    """
    if not views:
        return []
    grad_scale, _ = K.scaler_of(opt)
    names = tuple(scalars[0])
    key = (rule, tuple(states), names, tuple(sorted(options.items())))
    packs: dict[tuple, Tensor] = {}
    invs: dict[torch.device, Tensor | None] = {}
    out = []
    for v, vals in zip(views, scalars):
        dev = v.data.device
        values = tuple(float(vals[n]) for n in names)
        sc = packs.get((values, dev))
        if sc is None:
            sc = packs[(values, dev)] = device_tensor(values, torch.float64, dev)
        if dev not in invs:
            invs[dev] = (
                None if grad_scale is None else grad_scale.to(dev, torch.float32).reciprocal()
            )
        rows = v.data.shape[0] if v.data.dim() > 0 else 1
        cols = math.prod(v.shape[1:])
        args = (
            _as_rows(v.data, rows, cols),
            _as_rows(v.grad, rows, cols),
            tuple(_as_rows(v.state[n], rows, cols) for n in states),
        )
        compiled = (
            K.mode() == "compile" and key not in _row_failed and rows > 0 and K._can_compile(dev)
        )
        if compiled:
            try:
                out.append(_row_kernel(key, True)(*args, sc, invs[dev]))
                continue
            except Exception as exc:  # noqa: BLE001 - any compile failure: the same maths eagerly
                _row_failed.add(key)
                log.warning(
                    "distopt: compiling the %s channel statistics failed (%s: %s); running them "
                    "eagerly (set %s=eager to skip compiling)",
                    rule.__name__, type(exc).__name__, exc, K.ENV,
                )  # fmt: skip
        fn = _row_kernel(key, False)
        step = max(1, K.EAGER_CHUNK // max(cols, 1))  # cache-sized temporaries
        chunks = [
            fn(args[0][a : a + step], args[1][a : a + step], tuple(t[a : a + step] for t in args[2]),
               sc, invs[dev])
            for a in range(0, rows, step)
        ]  # fmt: skip
        out.append(
            torch.cat(chunks, dim=1) if chunks else v.data.new_zeros(4, 0, dtype=torch.float32)
        )
    return out


def prescale_(
    opt: Any,
    ctx: StepContext,
    views: Sequence[ParamView],
    stats: Sequence[Tensor],
    *,
    delta: float,
    wd_ratio: float,
    eps: float,
    rates: Sequence[float],
    steps: Sequence[float],
) -> None:
    """Decide each view's projection from its :func:`row_sums` ``stats`` and fold it, with the
    weight decay, into the weights: channel ``c`` of ``w`` is multiplied by
    ``1 - rate * r + step * coef_c`` (``r``: ``wd_ratio`` when projected, else 1; ``coef_c``:
    ``<w_c, u_c> / (||w_c|| + eps)^2`` for the channel view, the layer's for the layer view,
    0 when not projected), so that ``w - step * u`` afterwards is the projected, decayed step.

    ``views`` have more than one dimension; ``rates[i]`` is the decay per unit ratio
    (``lr * weight_decay`` for AdamP, 0 without decay), ``steps[i]`` the multiplier of ``u`` in
    the update.  The decisions stay on the device (one :meth:`StepContext.reduce` for the
    layer sums and the count of failing channels); a step ``GradScaler`` skips leaves ``w``
    as it was.
    """
    if not views:
        return
    partial = []
    for v, st in zip(views, stats):
        pp, gg, pg, pu = st.unbind(0)
        cos = pg.abs() / (gg.sqrt().clamp_min(eps) * pp.sqrt().clamp_min(eps))
        # a channel "fails" unless cos < threshold (a NaN fails, as max() would propagate it)
        fails = (~(cos < delta / math.sqrt(math.prod(v.shape[1:])))).sum()
        partial.append(torch.stack([fails.float(), pg.sum(), gg.sum(), pp.sum(), pu.sum()]))
    (totals,) = ctx.reduce([partial], list(views))
    _, found_inf = K.scaler_of(opt)
    # float64 where the device has it: the thresholds and coefficients the host would compute
    wide = torch.float32 if totals[0].device.type == "mps" else torch.float64
    for v, st, tot, rate, step in zip(views, stats, totals, rates, steps):
        fails, pg, gg, pp, pu = tot.to(wide).unbind(0)
        ch = fails == 0
        cos = pg.abs() / (gg.sqrt().clamp_min(eps) * pp.sqrt().clamp_min(eps))
        ly = ~ch & (cos < delta / math.sqrt(v.numel))
        r_pp, r_pu = st[0].to(wide), st[3].to(wide)
        d, dl = r_pp.sqrt() + eps, pp.sqrt() + eps
        coef = torch.where(ch, r_pu / (d * d), torch.where(ly, pu / (dl * dl), 0.0))
        ratio = torch.where(ch | ly, wd_ratio, 1.0).to(wide)  # type: ignore[call-overload]
        factor = (1.0 - rate * ratio) + step * coef
        if found_inf is not None:
            factor = torch.where(found_inf.to(factor.device) > 0, 1.0, factor)
        if v.data.dim() > 0:
            v.data.mul_(factor.to(v.data.dtype).reshape((-1,) + (1,) * (v.data.dim() - 1)))
        else:
            v.data.mul_(factor.to(v.data.dtype).reshape(()))
