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
) -> list[float]:
    """Project ``updates`` (fresh tensors, modified in place); return each weight-decay ratio.

    ``views[i].data`` holds the weights before this step's decay, ``grads[i]`` the gradient
    (not modified).  Returns ``wd_ratio`` for projected parameters and 1.0 for the others.
    """
    n = len(views)
    ratios = [1.0] * n
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
    table: dict[int, list[float]] = {}  # i -> reduced [fails, <p,g>, <g,g>, <p,p>, <p,u>]
    if cand:
        (stats,) = ctx.reduce([stats], sharded)
        rows_ = torch.stack([stats[i] for i in cand]).tolist()  # one host sync for all decisions
        table = dict(zip(cand, rows_))
    mode: dict[int, str] = {}
    for i, (fails, pg, gg, pp, pu) in table.items():
        v = views[i]
        if fails == 0:
            r_pp, _, r_pu = rows[i]
            d = r_pp.sqrt() + eps
            _project_rows_(updates[i], _rows(v.data, v), r_pu / (d * d))
            mode[i] = "channel"
        else:
            cos = abs(pg) / (max(math.sqrt(gg), eps) * max(math.sqrt(pp), eps))
            if not cos < delta / math.sqrt(v.numel):
                continue
            d = math.sqrt(pp) + eps
            updates[i].sub_(v.data, alpha=pu / (d * d))
            mode[i] = "layer"
        ratios[i] = wd_ratio
    if not caution:
        return ratios

    # ---- phase 2 (caution): mask mean (whole tensor) and the re-projection's inner products
    masks: list[Tensor] = []
    stats2: list[Tensor] = []
    for i, v in enumerate(views):
        g, u = grads[i], updates[i]
        m = mode.get(i)
        if m is None:
            mask = (u * g > 0).to(g.dtype)
            stats2.append(torch.stack([mask.sum(), mask.new_zeros(())]).float())
        else:
            p2 = _rows(v.data, v)
            if m == "channel":
                r_pp, r_pg, _ = rows[i]
                d = r_pp.sqrt() + eps
                radial = p2 * (r_pg / (d * d)).unsqueeze(1)
            else:
                pg, pp = table[i][1], table[i][3]
                radial = p2 * (pg / (math.sqrt(pp) + eps) ** 2)
            mask = (u * (g - radial.reshape(g.shape)) > 0).to(g.dtype)
            pum = (v.data * u * mask).sum()
            stats2.append(torch.stack([mask.sum(), pum]).float())
        masks.append(mask)
    (stats2,) = ctx.reduce([stats2], sharded)
    sums = torch.stack(stats2).tolist()
    scales = [1.0 / max(s[0] / max(v.numel, 1), 1e-3) for s, v in zip(sums, views)]
    torch._foreach_mul_(list(updates), masks)
    torch._foreach_mul_(list(updates), scales)
    for i, m in mode.items():  # remove the radial part the masking brought back
        v = views[i]
        p2, u2 = _rows(v.data, v), _rows(updates[i], v)
        if m == "channel":
            r_pp = rows[i][0]
            d = r_pp.sqrt() + eps
            _project_rows_(updates[i], p2, _rowdot(p2, u2) / (d * d))
        else:
            pp = table[i][3]
            updates[i].sub_(v.data, alpha=sums[i][1] * scales[i] / (math.sqrt(pp) + eps) ** 2)
    return ratios
