"""The maths of factored second moments: Adafactor's and AdafactorBigVision's per-tensor phases.

Both optimizers keep, for a tensor factored over dims ``(dc, dr)``, a row statistic ``R`` (the
mean of ``g^2 + eps`` over ``dr``) and a column statistic ``C`` (the mean over ``dc``), and
precondition with ``u = g / sqrt((R / mean_dc(R)) outer C)``; unfactored tensors keep the whole
``V`` and use ``u = g / sqrt(V)``.  Every tensor is seen through a 5-D view ``(P, N_lo, M, N_hi,
S)`` with ``(lo, hi) = sorted((dc, dr))`` in positions 1 and 3, so one function serves every
factoring (last two dims, dims (0, 1) of a convolution kernel, the two largest dims).

Each function here is pure maths over one tensor (or a stack of equal unfactored tensors), run
compiled or eagerly by :mod:`distopt.optim._rule_factored` (the runner, which also says when each
phase runs):

1. ``stats_*``: one read of ``g`` (and of ``p`` for the parameter RMS): the row and column sums
   of ``g^2``, the new row statistic when it is local, and the update's sum of squares from the
   column sums of ``g^2 / R`` (see :func:`stats_factored`).
2. ``precond_factored``: after the partial sums are added across ranks, the statistics that
   needed them and the row and column factors of the preconditioner (small tensors, computed once).
3. :func:`scales`: the per-tensor factors (``lr / clip`` and the decay, or Big Vision's clip
   divisor) from the whole-tensor sums.
4. ``apply_*``: the element-wise update of ``p`` and the first moment.

:func:`step_factored` is the four of them for a tensor whose statistics are all local (not
sharded, no cautious mask): one call, no reduction between the phases.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from distopt.optim import _kernel as K

__all__ = [
    "SC",
    "pack",
    "Layout",
    "layout",
    "Options",
    "stats_factored",
    "precond_factored",
    "apply_factored",
    "stats_plain",
    "apply_plain",
    "scales",
    "step_factored",
]

#: positions in each tensor's scalar pack (float64; float32 for Big Vision's float32 tensors, whose
#: maths casts every entry to float32 where it uses it)
SC = {
    "w2": 0,
    "b2": 1,
    "eps": 2,
    "n_r": 3,
    "n_c": 4,
    "b1": 5,
    "w1": 6,
    "lr": 7,  # Big Vision's lr; transformers/timm: the lr before the parameter-scale factor
    "decay": 8,  # Big Vision's decay factor of p
    "numel": 9,
    "root_n": 10,  # sqrt(numel): RMS = sqrt(sum of squares) / root_n
    "clip": 11,  # the clip threshold of the update RMS
    "wd": 12,  # transformers/timm: weight decay (p is multiplied by 1 - wd * lr)
    "eps_scale": 13,  # transformers/timm: lower bound of the parameter RMS in the scale factor
    "swap": 14,  # 1: the runner passed the row and column statistics swapped (see _factors)
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
    psq: bool  # phase 1 also sums p^2 (the parameter RMS, kept as the state "RMS")
    scale: bool  # the lr is multiplied by max(eps_scale, RMS(p)) ("hf" only)
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


def _factors(
    row: Tensor, col: Tensor, rnorm: Tensor, sc: Tensor, dr: int, either: bool = False
) -> tuple[Tensor, Tensor]:
    """The row and column factors of ``1 / sqrt((R / mean_dc(R)) outer C)`` (``rnorm``: the sum
    of ``R`` over ``dc``); small tensors, realised once (not recomputed per element).

    ``either``: ``row`` and ``col`` may come swapped, as the pack's ``swap`` says (a value read
    at run time, so that one kernel serves both orientations of a matrix): then ``col`` is the
    row statistic, normalised by its mean over ``dr`` (``n_r`` and ``n_c`` swapped in the pack
    too), and ``row`` is not normalised.  Dividing the other factor by an exact 1 leaves it as
    it was, and the product of the two factors is the same in either order (multiplication
    commutes), so the update is bitwise the one of the unswapped call."""
    if not either:
        return torch.rsqrt(row / (rnorm / sc[SC["n_c"]])), torch.rsqrt(col)
    swap = sc[SC["swap"]] > 0
    rn = torch.where(swap, 1.0, rnorm / sc[SC["n_c"]])
    cn = torch.where(swap, col.sum(dim=dr, keepdim=True) / sc[SC["n_r"]], 1.0)
    return torch.rsqrt(row / rn), torch.rsqrt(col / cn)


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


#: rows per block of a blocked sum over dim 1 of the 5-D view (see :func:`_sum`)
BLOCK = 16


def _sum(x: Tensor, d: int, block: bool) -> Tensor:
    """The sum of a 5-D ``x`` over dim ``d`` (1 or 3), kept.  Over dim 3 (contiguous) a plain
    row reduction.  Over dim 1 with ``block`` (the runner's choice for a compiled call on at
    least :data:`BLOCK` rows): in blocks of :data:`BLOCK` rows, then over the blocks and the
    rows past the last whole block.  A compiled sum over dim 1 walks each 16-column strip down
    every row (a strided read: ~1.5x the time of a row-order read on a CPU; Big Vision's row
    statistic of a tall matrix, Adafactor's column statistic); a block reads its 16 rows side by
    side.  The same sum in another order (float32 rounding may differ in the last bits)."""
    if d != 1 or not block:
        return x.sum(dim=d, keepdim=True)
    n = x.shape[1]
    nb = n // BLOCK
    head = x.narrow(1, 0, nb * BLOCK).unflatten(1, (nb, BLOCK)).sum(2).sum(1, keepdim=True)
    # the rows past the last whole block, as the last BLOCK rows with those already summed left
    # out (a slice of n % BLOCK rows would be specialised on being empty or not: two kernels)
    row = torch.arange(n - BLOCK, n, device=x.device).view(1, BLOCK, 1, 1, 1)
    tail = torch.where(row >= nb * BLOCK, x.narrow(1, n - BLOCK, BLOCK), 0.0)
    return head + tail.sum(1, keepdim=True)


def _mask(d: Tensor, g: Tensor) -> Tensor:
    """The cautious mask (arXiv:2411.16085): where the direction and the gradient agree in sign."""
    return (d * g > 0).to(d.dtype)


def _finish(p, g, u, m, pre, decay, agree, sc, fi, opt: Options, phase: str, one=None):
    """The element-wise end of phase 3: ``phase="mask"`` returns the cautious mask's count;
    ``"update"`` writes the new parameter and first moment.  ``decay``: the factor ``p`` is
    multiplied by (a tensor for transformers, whose lr may depend on the parameter RMS; from the
    scalar pack for Big Vision); ``agree``: the mask's count over the whole tensor; ``one``: ones
    broadcast like the preconditioner (see :func:`apply_factored`) or None."""
    d, m_new = _direction(u, m, pre, sc, opt)
    if phase == "mask":
        return _mask(d, g).sum(dtype=torch.float32)
    stored = m_new is not None and one is None and m.dtype != p.dtype
    if stored:
        # A low-precision first moment (Big Vision's bfloat16) is stored first, by an in-place
        # foreach copy, and the direction read back from it: inductor then writes the moment in
        # the (rows, cols) loop that computes it and the flat loop of p reads the stored moment
        # (with copy_ stores the new moment went through a per-call buffer of its size, copied
        # into the state by p's loop: 2 bytes per element more and a buffer per call). The same
        # numbers: m_new.to(d.dtype) is what the stored moment reads back as (where found_inf
        # keeps the old moment, p keeps its old value too).
        K._store_foreach([(m, m_new)], fi)
        d = m.to(d.dtype)
    if agree is not None:
        d = d * (_mask(d, g) / torch.clamp(agree / sc[SC["numel"]], min=1e-3))
    kept = p
    if opt.flavour == "bv":
        d = d * sc[SC["lr"]]
        if opt.decay:
            kept = p * sc[SC["decay"]]
    elif opt.decay:
        kept = p * decay
    new_p = kept - d
    if one is not None:
        new_p, m_new = new_p * one, m_new * one
    K._store([(p, new_p)] + ([] if m_new is None or stored else [(m, m_new)]), fi)
    return None


def stats_factored(
    p, g, row, sc, inv, fi, *, dc: int, dr: int, row_local: bool, opt: Options, block: bool = False
):
    """Phase 1 of a factored tensor: returns (row sums of g^2 or None, column sums of g^2, sum
    over dc of the new row statistic or None, column sums of ``g^2 / R`` or None, sum of p^2 or
    None); writes the local row statistic.

    ``sum(u^2) = sum_ij g_ij^2 mean_dc(R) / (R_i C_j) = mean_dc(R) sum_j (sum_i g_ij^2 / R_i) / C_j``:
    with a local row statistic ``R``, the column sums of ``g^2 / R`` (the same loop as those of
    ``g^2``) give the update's RMS without another read of ``g`` (over local rows: the partial
    sum of ``u^2`` that the reduction of the update sums completes).  ``block``: sums over dim 1
    in blocks of rows (see :func:`_sum`)."""
    g = _grad(g, inv)
    gsq = g * g
    psq = g3 = None
    if opt.psq:
        # The sum of p^2 and the sums of g^2 over dim 3 have the same (rows, cols) loop, but
        # inductor fuses two loops only when they share a read (the runner lowers the amount
        # it asks for to any, see _rule_factored.fusion_options): both are multiplied by an
        # exact 1.0 from the scalar pack (x * 1.0 == x for every float, -0, inf and NaN too),
        # so p and g are read in one loop instead of two.
        one = sc[SC["numel"]] / sc[SC["numel"]]  # numel >= 1
        psq, g3 = _total(p * p * one), gsq * one
    csum = _sum(g3 if g3 is not None and dc == 3 else gsq, dc, block)
    rsum = _sum(g3 if g3 is not None and dr == 3 else gsq, dr, block)
    if not row_local:
        return rsum, csum, None, None, psq
    new_row = _ema(row, rsum / sc[SC["n_r"]] + sc[SC["eps"]], sc, opt.flavour)
    K._store([(row, new_row)], fi)
    # times the reciprocal of the (small) row statistic: no division per element
    wsum = _sum(gsq * torch.reciprocal(new_row), dc, block) if opt.clip else None
    return None, csum, new_row.sum(dim=dc, keepdim=True), wsum, psq


def precond_factored(
    g,
    row,
    col,
    rsum,
    csum,
    rnorm,
    wsum,
    sc,
    inv,
    fi,
    *,
    dc: int,
    row_local: bool,
    opt: Options,
    either: bool = False,
):
    """Phase 2 of a factored tensor (the partial sums now whole): the column statistic and, when
    it needed the reduction, the row statistic; returns the row and column factors and the sum
    of ``u^2`` (or None): from ``wsum`` (see :func:`stats_factored`) with a local row statistic,
    else one read of ``g`` (``g`` is None with a local row statistic).  ``either``: the
    statistics may come swapped (see :func:`_factors`; not with ``opt.clip``)."""
    new_col = _ema(col, csum / sc[SC["n_c"]] + sc[SC["eps"]], sc, opt.flavour)
    K._store([(col, new_col)], fi)
    if row_local:
        new_row = row
    else:
        new_row = _ema(row, rsum / sc[SC["n_r"]] + sc[SC["eps"]], sc, opt.flavour)
        K._store([(row, new_row)], fi)
        rnorm = new_row.sum(dim=dc, keepdim=True)
    r_factor, c_factor = _factors(new_row, new_col, rnorm, sc, 4 - dc, either)
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
    one = None
    if m is not None and m.dtype == p.dtype:
        # With a first moment of p's dtype, both stores read the new moment. p's and m's own
        # loops are flat (no broadcast) and the moment's is (rows, cols) (the factors), so a
        # compiled kernel would write the moment to a temporary of p's size, allocated per call,
        # and read it back (~1.7x the time of this update). Multiplying both stores by exact
        # ones broadcast like the factors gives them the same loop (x * 1 == x, also for
        # -0, inf, NaN; the ones are NaN only where a factor is inf or NaN, which makes every u
        # of that row or column NaN already). Not for a low-precision moment: there the
        # conversions, not the temporary, dominate (measured slower).
        one = (r_factor * 0.0 + c_factor * 0.0) + 1.0
    u = (r_factor * c_factor) * g
    return _finish(p, g, u, m, pre, decay, agree, sc, fi, opt, phase, one)


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


def scales(psq: Tensor | None, usq: Tensor | None, sc: Tensor, opt: Options):
    """The per-tensor factors from the whole-tensor sums of ``p^2`` and ``u^2`` (0-dim, or one
    entry per tensor with ``sc`` the stacked packs, ``(n, len(SC))``): ``(pre, decay, rms, lr)``.

    transformers/timm: ``rms = RMS(p)`` (float32), ``lr = sc.lr * max(eps_scale, rms)`` with the
    parameter-scale factor (float64, else ``sc.lr``), ``pre = lr / max(1, RMS(u) / clip)``
    (float32) and ``decay = 1 - wd * lr`` (float32, None without weight decay).  Big Vision:
    ``pre`` is the clip divisor ``max(1, RMS(u) / clip)`` (None without clipping), the rest None."""

    def col(name: str) -> Tensor:
        return sc[..., SC[name]]

    def root_mean(sq: Tensor) -> Tensor:
        return sq.float().clamp_min(0).sqrt() / col("root_n").float()

    if opt.flavour == "bv":
        if not opt.clip or usq is None:
            return None, None, None, None
        return (root_mean(usq) / col("clip").float()).clamp(min=1.0), None, None, None
    rms = root_mean(psq)  # type: ignore[arg-type]
    lr = col("lr")
    if opt.scale:
        lr = lr * rms.to(lr.dtype).clamp_min(col("eps_scale"))
    clip = (root_mean(usq) / col("clip").float()).clamp(min=1.0)  # type: ignore[arg-type]
    decay = (1.0 - col("wd") * lr).to(torch.float32) if opt.decay else None
    return lr.to(clip.dtype) / clip, decay, rms, lr


def step_factored(
    p,
    g,
    m,
    row,
    col,
    rms,
    sc,
    inv,
    fi,
    *,
    dc: int,
    dr: int,
    opt: Options,
    block: bool = False,
    either: bool = False,
):
    """The whole step of a factored tensor whose statistics are all local (not sharded; without
    the cautious mask): :func:`stats_factored`, :func:`precond_factored`, :func:`scales` and
    :func:`apply_factored` in one call; writes the row and column statistics, ``rms`` (the
    parameter RMS state, "hf"), ``p`` and the first moment.  Returns the lr ("hf"; None for Big
    Vision), then the row and column factors and the per-tensor ``pre`` and ``decay``.
    ``either``: ``row`` and ``col`` may come swapped, as the pack's ``swap`` says (see
    :func:`_factors`); not with ``opt.clip`` (its sum of ``u^2`` runs over ``dc``)."""
    if either and opt.clip:
        raise ValueError("step_factored: either=True needs opt.clip=False")
    _, csum, rnorm, wsum, psq = stats_factored(
        p, g, row, sc, inv, fi, dc=dc, dr=dr, row_local=True, opt=opt, block=block
    )
    r_factor, c_factor, usq = precond_factored(
        None,
        row,
        col,
        None,
        csum,
        rnorm,
        wsum,
        sc,
        inv,
        fi,
        dc=dc,
        row_local=True,
        opt=opt,
        either=either,
    )
    pre, decay, new_rms, lr = scales(psq, usq, sc, opt)
    if new_rms is not None:
        K._store([(rms, new_rms)], fi)
    apply_factored(
        p, g, m, r_factor, c_factor, pre, decay, None, sc, inv, fi, opt=opt, phase="update"
    )
    # the factors are returned so that a compiled kernel realises them once (small buffers)
    # instead of recomputing them (rsqrt, divisions) for every element of the update
    return lr, r_factor, c_factor, pre, decay
