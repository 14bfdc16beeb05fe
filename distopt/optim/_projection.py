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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from distopt.optim._core import ParamView, StepContext
from distopt.optim._functional import device_tensor

__all__ = ["project_"]


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
