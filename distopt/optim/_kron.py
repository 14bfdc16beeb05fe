"""The whole-tensor maths of PSGD Kron: Kronecker-factored preconditioners and their update.

PSGD (Xi-Lin Li, "Preconditioned stochastic gradient descent", 2015, and "Black box Lie group
preconditioners for SGD", 2022; https://github.com/lixilinx/psgd_torch) preconditions a gradient
``G`` of shape ``(d_1, ..., d_n)`` with ``P = Q^T Q``, ``Q = Q_1 (x) ... (x) Q_n``: each factor
``Q_k`` is an upper-triangular ``d_k x d_k`` matrix or a diagonal (kept as a vector).  With
``M x_k T`` the mode-``k`` product (``M`` applied along dim ``k`` of ``T``):

* preconditioned gradient: ``P G = G x_1 (Q_1^T Q_1) ... x_n (Q_n^T Q_n)``;
* factor update from a probe ``V ~ N(0, I)``: ``A = G x_k Q_k`` (all ``k``),
  ``B = V x_k Q_k^{-T}`` (all ``k``); for each ``k``, with ``A_(k)`` the mode-``k`` unfolding,
  ``T1 = A_(k) A_(k)^T``, ``T2 = B_(k) B_(k)^T`` (their diagonals for a diagonal factor) and
  ``Q_k <- Q_k - lr_P (T1 - T2) Q_k / ||T1 + T2||`` — the update kept upper triangular
  (``triu``) and normalised by a cheap lower bound of the spectral norm for a triangular factor,
  element-wise with the max-norm for a diagonal one;
* balancing: every factor scaled to the geometric mean of the factors' max-norms (the product
  ``Q`` is unchanged).

Everything here works on *whole* tensors; :class:`~distopt.optim.kron.Kron` brings the rows of a
sharded parameter to one owner rank first (:mod:`distopt.optim._whole`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "TINY",
    "apply_preconditioner",
    "balance_",
    "diagonal_dims",
    "flattened_shape",
    "init_factors",
    "kron_cost",
    "norm_lower_bound",
    "update_factors_",
    "update_probability",
]

#: added to the normalisers (the smallest normal bfloat16, as in the published implementations)
TINY = torch.finfo(torch.bfloat16).tiny

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")


def update_probability(
    step: int,
    max_prob: float = 1.0,
    min_prob: float = 0.03,
    decay: float = 0.001,
    flat_start: float = 500,
) -> Tensor:
    """The default preconditioner update probability at ``step``: 1 for ``flat_start`` steps,
    then ``max_prob * exp(-decay * (step - flat_start))``, clamped to ``[min_prob, max_prob]``
    (a float32 scalar, as the schedule is published)."""
    n = torch.tensor(step, dtype=torch.float32)
    return (max_prob * torch.exp(-decay * (n - flat_start))).clamp(min=min_prob, max=max_prob)


def flattened_shape(shape: Sequence[int], flatten: bool, start: int, end: int) -> torch.Size:
    """The shape the preconditioner sees: dims ``start..end`` merged when ``flatten`` (nothing
    when the tensor has ``<= start`` dims or the range is empty); a 0-dim parameter is one
    element (``(1,)``, which gives the same preconditioner as a scalar)."""
    shape = torch.Size(shape) if len(shape) else torch.Size([1])
    if not flatten:
        return shape
    n = len(shape)
    end = min(end if end >= 0 else n + end, n - 1)
    if n <= start or start > end:
        return shape
    return torch.Size([*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :]])


def diagonal_dims(
    shape: Sequence[int], max_size: int, min_ndim: int, memory_save_mode: str | None
) -> list[bool]:
    """Which dims get a diagonal factor (the others an upper-triangular one)."""
    n = len(shape)
    forced = [False] * n
    if n and memory_save_mode == "all_diag":
        forced = [True] * n
    elif n and memory_save_mode in ("one_diag", "smart_one_diag"):
        largest = max(range(n), key=lambda i: (shape[i], i))  # ties: the last of the largest
        ordered = sorted(shape)
        if memory_save_mode == "one_diag" or (n >= 2 and ordered[-1] > ordered[-2]):
            forced[largest] = True
    elif memory_save_mode not in MEMORY_SAVE_MODES:
        raise ValueError(
            f"Invalid memory_save_mode: {memory_save_mode!r} (choose from None, 'one_diag', "
            "'smart_one_diag', 'all_diag')"
        )
    return [d == 1 or d > max_size or n < min_ndim or f for d, f in zip(shape, forced)]


def init_factors(
    shape: Sequence[int], diag: Sequence[bool], scale: float, dtype: torch.dtype, device
) -> list[Tensor]:
    """``Q_k = scale^(1/n) I`` (a vector of that value for a diagonal factor)."""
    s = scale ** (1.0 / len(shape))
    return [
        torch.full((d,), s, dtype=dtype, device=device)
        if dg
        else s * torch.eye(d, dtype=dtype, device=device)
        for d, dg in zip(shape, diag)
    ]


def factor_numel(shape: Sequence[int], diag: Sequence[bool]) -> int:
    """Number of elements of all factors."""
    return sum(d if dg else d * d for d, dg in zip(shape, diag))


def kron_cost(shape: Sequence[int], diag: Sequence[bool]) -> float:
    """Rough FLOPs of one update (factor update + preconditioning), to balance owners."""
    numel = math.prod(shape)
    return float(sum(numel * (1 if dg else d) + (0 if dg else d**3) for d, dg in zip(shape, diag)))


#: triangular factors of at least twice this size are multiplied block-wise (see :func:`_tri_mm`)
TRI_BLOCK = 256


def _tri_mm(q: Tensor, x: Tensor, upper: bool, out: Tensor | None = None) -> Tensor:
    """``q @ x`` for a triangular ``(d, d)`` matrix ``q`` (upper or lower), without the
    products with its zero block: split in halves, ``[[Q11, Q12], [0, Q22]] [X1; X2]`` is
    ``[Q11 X1 + Q12 X2; Q22 X2]`` (three block products of four), recursively down to
    ``TRI_BLOCK`` (about half the multiply-adds of the dense product for a large ``d``).  The
    same value as ``q @ x`` where the zero block is exactly zero; the sums are grouped by blocks.
    """
    d = q.shape[0]
    if out is None:
        out = x.new_empty((d, x.shape[1]))
    if d < 2 * TRI_BLOCK:
        return torch.mm(q, x, out=out)
    h = d // 2
    x1, x2 = x[:h], x[h:]
    if upper:
        _tri_mm(q[:h, :h], x1, True, out[:h]).addmm_(q[:h, h:], x2)
        _tri_mm(q[h:, h:], x2, True, out[h:])
    else:
        _tri_mm(q[:h, :h], x1, False, out[:h])
        _tri_mm(q[h:, h:], x2, False, out[h:]).addmm_(q[h:, :h], x1)
    return out


def _triu_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for upper-triangular ``a`` and ``b`` (itself upper triangular): block-wise,
    ``C11 = A11 B11``, ``C12 = A11 B12 + A12 B22``, ``C22 = A22 B22``, ``C21 = 0``
    (about a third of the multiply-adds of the dense product for a large ``d``)."""
    d = a.shape[0]
    if d < 2 * TRI_BLOCK:
        return a @ b
    h = d // 2
    out = a.new_empty((d, d))
    out[h:, :h].zero_()
    out[:h, :h] = _triu_product(a[:h, :h], b[:h, :h])
    _tri_mm(a[:h, :h], b[:h, h:], True, out[:h, h:])
    out[:h, h:].add_(_tri_mm(b[h:, h:].t(), a[:h, h:].t(), False).t())  # A12 B22 = (B22^T A12^T)^T
    out[h:, h:] = _triu_product(a[h:, h:], b[h:, h:])
    return out


def _mode_product(t: Tensor, q: Tensor, k: int, transpose: bool = False) -> Tensor:
    """``q x_k t`` (``q^T`` with ``transpose``); a diagonal ``q`` scales dim ``k``, a
    triangular one (upper; lower when transposed) multiplies block-wise (:func:`_tri_mm`)."""
    if q.dim() == 1:
        view = [1] * t.dim()
        view[k] = q.shape[0]
        return t * q.view(view)
    moved = t.movedim(k, 0)
    x = moved.reshape(q.shape[0], -1)
    y = _tri_mm(q.t() if transpose else q, x, upper=not transpose)
    return y.view(moved.shape).movedim(0, k)


def _solve_mode(t: Tensor, q: Tensor, k: int) -> Tensor:
    """``Q^{-T} x_k t``: along dim ``k``, rows ``x`` become ``x Q^{-1}`` (``t / q`` if diagonal)."""
    if q.dim() == 1:
        view = [1] * t.dim()
        view[k] = q.shape[0]
        return t / q.view(view)
    x = t.movedim(k, -1)
    shape = x.shape
    dtype = x.dtype
    sol = torch.linalg.solve_triangular(
        q.float(), x.reshape(-1, shape[-1]).float(), upper=True, left=False
    )
    return sol.reshape(shape).to(dtype).movedim(-1, k)


def _gram(t: Tensor, k: int, diagonal: bool) -> Tensor:
    """``T_(k) T_(k)^T`` of the mode-``k`` unfolding (its diagonal when ``diagonal``)."""
    u = t.movedim(k, 0).reshape(t.shape[k], -1)
    if diagonal:
        return (u * u).sum(dim=1)
    return u @ u.t()


def norm_lower_bound(a: Tensor) -> Tensor:
    """A cheap lower bound of the spectral norm of the symmetric matrix ``a`` (one power step
    from its largest row or column), without a host read; 0 for a zero matrix."""
    max_abs = a.abs().amax()
    safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    s = a / safe
    sq = s * s
    col, i = sq.sum(dim=0).max(dim=0)
    row, j = sq.sum(dim=1).max(dim=0)
    x_col = s.index_select(1, i.reshape(1)).reshape(-1) @ s
    x_row = s @ s.index_select(0, j.reshape(1)).reshape(-1)
    by_col = torch.linalg.vector_norm((x_col / torch.linalg.vector_norm(x_col)) @ s.t())
    by_row = torch.linalg.vector_norm(s.t() @ (x_row / torch.linalg.vector_norm(x_row)))
    bound = safe * torch.where(col > row, by_col, by_row)
    return torch.where(max_abs > 0, bound, max_abs)


def balance_(factors: list[Tensor]) -> None:
    """Scale each factor to the geometric mean of the factors' max-norms (in place)."""
    norms = torch.stack([q.abs().amax() for q in factors])
    mean = norms.prod() ** (1.0 / len(factors))
    scales = mean / norms
    for k, q in enumerate(factors):
        q.mul_(scales[k])


def update_factors_(factors: list[Tensor], g: Tensor, v: Tensor, lr: float) -> None:
    """One PSGD step of every factor from the gradient (or momentum) ``g`` and probe ``v``."""
    a = g
    for k, q in enumerate(factors):
        a = _mode_product(a, q, k)
    b = v
    for k, q in enumerate(factors):
        b = _solve_mode(b, q, k)
    for k, q in enumerate(factors):
        diag = q.dim() == 1
        t1, t2 = _gram(a, k, diag), _gram(b, k, diag)
        step = (t1 - t2) * lr
        if diag:
            step = step * q / ((t1 + t2).abs().amax() + TINY)
        else:
            step = torch.triu(step) / (norm_lower_bound(t1 + t2) + TINY)
            step = _triu_product(step, q)
        q.sub_(step)


def apply_preconditioner(factors: list[Tensor], g: Tensor) -> Tensor:
    """``P g = g x_k (Q_k^T Q_k)`` over every dim."""
    out = g
    for k, q in enumerate(factors):
        out = _mode_product(_mode_product(out, q, k), q, k, transpose=True)
    return out
