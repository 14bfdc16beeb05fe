"""Orthogonalisation by Newton-Schulz iteration: the whole-matrix maths of the Muon family.

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/) replaces a matrix update
``G`` by an approximation of ``U V^T`` (``G = U S V^T``), computed with a few odd-polynomial
Newton-Schulz steps ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` after scaling ``X`` to a
spectral norm of at most one (the Frobenius norm bounds it).  The coefficient presets are the
published ones: Jordan's ``(3.4445, -4.7750, 2.0315)``, You Jiacheng / Keller Jordan's tuned
quintic sequence, and Polar Express (Amsel et al., 2025, https://arxiv.org/abs/2505.16932) with
its two published safety margins.

Everything here works on *whole* matrices (a batch of matrices of one shape at a time); the
sharded engines bring the rows to one owner rank first (see :mod:`distopt.optim._whole`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NS_PRESETS",
    "adamuon_lr_scale",
    "muon_lr_scale",
    "newton_schulz",
    "ns_flops",
    "resolve_coefficients",
    "suitable_for_muon",
    "to_matrix",
    "from_matrix",
]

NS_PRESETS: dict[str, list[tuple[float, float, float]]] = {
    "original": [(3.4445, -4.7750, 2.0315)],
    "quintic": [
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ],
    "polar_express": [
        (8.237312490495555, -23.157747414558198, 16.680568411445915),
        (4.082441999064835, -2.893047735332586, 0.5252849256975648),
        (3.9263479922546582, -2.8547468034765298, 0.5318022422894988),
        (3.2982187133085143, -2.424541981026706, 0.48632008358844075),
        (2.2970369434552573, -1.63662558125903, 0.4002628455953627),
        (1.8763805351440397, -1.2347896577722228, 0.35891887501668385),
        (1.8564423485617974, -1.2132449880935525, 0.3568003487825883),
        (1.8749994008682747, -1.2499988017229169, 0.3749994008546422),
    ],
    "polar_express_safer": [
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.0429299351667245, -2.808917465908704, 0.5000178451051299),
        (3.8916678022926563, -2.7724841532176825, 0.5060648178503389),
        (3.285753657755658, -2.3681294933425394, 0.46449024233003117),
        (2.3005307116270983, -1.6111665557258408, 0.3833374427545273),
        (1.8631210546382593, -1.2042160621002727, 0.3421879560523383),
        (1.8382572152247512, -1.1779263289537742, 0.3396513038637379),
        (1.8749999923301852, -1.2499999836060613, 0.374999991275876),
    ],
}


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def resolve_coefficients(value: Any) -> list[tuple[float, float, float]]:
    """A preset name, one ``(a, b, c)`` triple or a sequence of triples -> list of triples."""
    if isinstance(value, str):
        if value not in NS_PRESETS:
            raise ValueError(
                f"unknown ns_coefficients preset {value!r}; choose from {', '.join(sorted(NS_PRESETS))} "
                "or pass (a, b, c) triples"
            )
        return list(NS_PRESETS[value])
    if not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(
            f"ns_coefficients must be a preset name, an (a, b, c) triple or a list of them, got {value!r}"
        )
    if len(value) == 3 and all(_is_real(v) for v in value):
        return [tuple(float(v) for v in value)]  # type: ignore[list-item]
    out = []
    for item in value:
        if not isinstance(item, Sequence) or len(item) != 3 or not all(_is_real(v) for v in item):
            raise ValueError(
                f"each Newton-Schulz coefficient must be an (a, b, c) triple of numbers, got {item!r}"
            )
        out.append(tuple(float(v) for v in item))
    return out  # type: ignore[return-value]


def _schedule(
    coeffs: list[tuple[float, float, float]], steps: int
) -> list[tuple[float, float, float]]:
    """``steps`` triples: the first ``steps`` of the list, the last one repeated if it is short."""
    return coeffs[:steps] + [coeffs[-1]] * max(0, steps - len(coeffs))


def newton_schulz(
    g: Tensor,
    steps: int,
    coefficients: list[tuple[float, float, float]],
    eps: float = 1e-7,
    safety_factor: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    scale_eps: bool = False,
) -> Tensor:
    """Approximate orthogonalisation of a matrix ``(m, n)`` or a batch ``(k, m, n)``.

    ``X = G / max(safety * ||G||_F, eps)`` (``/ (safety * ||G||_F + eps')`` with
    ``eps' = eps * sqrt(n / m)`` when ``scale_eps``, the muP damping of arXiv:2512.05620), then
    ``X <- a X + (b A + c A A) X`` with ``A = X X^T`` for each triple, on the orientation with
    the smaller Gram matrix, in ``dtype``.  Returns a new tensor of ``g``'s shape in ``dtype``.
    """
    if g.dim() not in (2, 3):
        raise ValueError(
            f"newton_schulz takes a matrix or a batch of matrices, got shape {tuple(g.shape)}"
        )
    if scale_eps:
        eps = eps * math.sqrt(g.shape[-1] / g.shape[-2])
    x = g.to(dtype=dtype, copy=True)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).mul_(safety_factor)
    x = x.div_(norm.add_(eps) if scale_eps else norm.clamp_(min=eps)).contiguous()
    mm = torch.baddbmm if x.dim() == 3 else torch.addmm
    gram = x.new_empty((*x.shape[:-1], x.shape[-2]))
    poly = torch.empty_like(gram)
    nxt = torch.empty_like(x)
    for a, b, c in _schedule(coefficients, steps):
        mm(gram, x, x.mT, beta=0.0, alpha=1.0, out=gram)  # A = X X^T
        mm(gram, gram, gram, beta=b, alpha=c, out=poly)  # b A + c A A
        mm(x, poly, x, beta=a, alpha=1.0, out=nxt)  # a X + (b A + c A A) X
        x, nxt = nxt, x
    return x.mT if tall else x


def ns_flops(shape: Sequence[int], steps: int) -> int:
    """Multiply-add FLOPs of ``steps`` Newton-Schulz iterations on a matrix of ``shape``
    (``(m, n)`` or ``(k, m, n)``; ``m <= n`` after orientation): ``k * steps * (4 m^2 n + 2 m^3)``."""
    k = shape[0] if len(shape) == 3 else 1
    m, n = sorted(shape[-2:])
    return int(k * steps * (4 * m * m * n + 2 * m**3))


# --------------------------------------------------------------------------- shapes


def suitable_for_muon(
    shape: Sequence[int], min_dim_size: int = 4, max_aspect_ratio: float = 128.0
) -> bool:
    """Whether a parameter of ``shape`` is orthogonalised (else it takes the AdamW fallback).

    The rule timm uses (facts of its routing): at least two dims larger than one; neither of the
    first two dims equal to one (position embeddings, depthwise convs); the matrix it becomes
    (``(out, in * spatial)`` for >= 3 dims) has both sides >= ``min_dim_size`` and an aspect
    ratio <= ``max_aspect_ratio``.
    """
    s = tuple(int(d) for d in shape)
    if len(s) < 2 or sum(1 for d in s if d > 1) < 2 or s[0] == 1 or s[1] == 1:
        return False
    dims = (s[0], math.prod(s[1:])) if len(s) >= 3 else s
    lo, hi = min(dims), max(dims)
    return lo >= min_dim_size and hi / lo <= max_aspect_ratio


def to_matrix(t: Tensor, conv_mode: str) -> Tensor:
    """A whole parameter-shaped tensor as what Newton-Schulz sees: 2-D as is; ``(out, in, *k)``
    as ``(out, in * prod(k))`` (``"flatten"``) or ``(prod(k), out, in)`` (``"batched"``)."""
    if t.dim() == 2:
        return t
    if conv_mode == "flatten":
        return t.reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], t.shape[1], -1).permute(2, 0, 1)


def from_matrix(m: Tensor, shape: Sequence[int], conv_mode: str) -> Tensor:
    """Inverse of :func:`to_matrix` for a parameter of ``shape``."""
    if len(shape) == 2:
        return m
    if conv_mode == "flatten":
        return m.reshape(shape)
    return m.permute(1, 2, 0).reshape(shape)


def matrix_shape(shape: Sequence[int], conv_mode: str) -> tuple[int, ...]:
    """The shape :func:`to_matrix` gives a parameter of ``shape``."""
    s = tuple(int(d) for d in shape)
    if len(s) == 2:
        return s
    if conv_mode == "flatten":
        return (s[0], math.prod(s[1:]))
    return (math.prod(s[2:]), s[0], s[1])


def muon_lr_scale(mshape: Sequence[int], adjust_lr_fn: str | None) -> float:
    """Muon's shape-dependent step-size factor for a matrix of shape ``mshape`` (last two dims
    ``(out, in)``): ``"original"`` sqrt(max(1, out/in)) (Jordan); ``"match_rms_adamw"``
    0.2 sqrt(max(out, in)) (Liu et al., 2025, arXiv:2502.16982); ``"rms_to_rms"`` sqrt(out/in)
    (Bernstein; Pethick et al., arXiv:2502.07529); None: 1."""
    if adjust_lr_fn is None:
        return 1.0
    out_ch, in_ch = mshape[-2], mshape[-1]
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, out_ch / in_ch))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(out_ch, in_ch))
    if adjust_lr_fn == "rms_to_rms":
        return math.sqrt(out_ch / in_ch)
    raise ValueError(
        f"invalid adjust_lr_fn {adjust_lr_fn!r} for Muon; choose from 'original', 'match_rms_adamw', 'rms_to_rms' or None"
    )


def adamuon_lr_scale(mshape: Sequence[int], adjust_lr_fn: str | None) -> tuple[float, bool]:
    """AdaMuon's step-size factor and whether the update is RMS-normalised (Si et al., 2025,
    arXiv:2507.11005): ``"match_rms_adamw"`` 0.2 sqrt(numel) with RMS normalisation;
    ``"rms_to_rms"`` sqrt(out/in); ``"rsqrt_in"`` 1/sqrt(in); None: 1."""
    if adjust_lr_fn is None:
        return 1.0, False
    out_ch, in_ch = mshape[-2], mshape[-1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(math.prod(mshape)), True
    if adjust_lr_fn == "rms_to_rms":
        return math.sqrt(out_ch / in_ch), False
    if adjust_lr_fn == "rsqrt_in":
        return in_ch**-0.5, False
    raise ValueError(
        f"invalid adjust_lr_fn {adjust_lr_fn!r} for AdaMuon; choose from 'match_rms_adamw', 'rms_to_rms', 'rsqrt_in' or None"
    )
