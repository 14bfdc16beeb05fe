"""Rule pieces of the trust-ratio optimizers (Lamb, Lars) and per-tensor gradient divisors.

* :func:`trust_ratio`: ``||w|| / ||u||`` inside a rule, from the whole-tensor sums of squares
  that :func:`distopt.optim._kernel.apply` delivers in ``s`` (``sums=``), 1 where either is 0.
* :func:`grad_divided`: what :func:`~distopt.optim._kernel.apply` should see as the optimizer
  when every gradient is also to be divided by a device tensor (Lamb's global clip factor,
  NvNovoGrad's per-tensor denominator): ``apply`` multiplies the gradient by ``1 / grad_scale``
  inside its kernels (both phases) and keeps ``GradScaler``'s ``found_inf``, so the divisor
  costs no pass over memory and no host read.
* :func:`once`: a per-tensor value of a rule computed once per kernel call, not per vector.
* :func:`grad_norm`: the global gradient norm (Lamb's clip): one read of every gradient
  (:func:`grad_sq_sums`: float32 CPU gradients in one native multi-stream call where it is
  built (:mod:`distopt.optim._sqsum`), else BLAS dots for large ones at 1 thread, and one
  ``_foreach_norm`` for the rest).
* :func:`squared_norms`: whole-tensor sums of squares per tensor, for
  :func:`~distopt.optim._kernel.apply`'s ``stats=`` (Lars' ``||w||^2``, ``||g||^2``;
  NvNovoGrad's ``||g||^2``): BLAS dots and ATen's ``_foreach_norm`` read at memory speed where
  a compiled sums pass does not (inductor's CPU sum loops are several times slower), and the
  update kernel then runs without a sums phase.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _kernel as K
from distopt.optim import _sqsum
from distopt.optim._core import ParamView, StepContext

__all__ = [
    "trust_ratio",
    "once",
    "grad_divided",
    "GradDivisor",
    "inv_grad_scale",
    "grad_norm",
    "grad_sq_sums",
    "squared_norms",
]


def trust_ratio(w_sq: Tensor, u_sq: Tensor, clip: bool) -> Tensor:
    """``sqrt(w_sq / u_sq)``; 1 where either sum of squares is not positive; ``min(r, 1)`` if
    ``clip``.  One division and one square root (a compiled rule recomputes per-tensor scalars
    for every vector of elements)."""
    r = torch.where((w_sq > 0) & (u_sq > 0), (w_sq / u_sq).sqrt(), torch.ones_like(w_sq))
    return torch.clamp(r, max=1.0) if clip else r


def once(x: Tensor) -> Tensor:
    """``x`` (a per-tensor value of a rule: 0-dim, or an ``(n, 1)`` column for stacked small
    tensors), computed once per compiled kernel call instead of once per vector of elements.

    Inductor inlines a value derived from a kernel's sums (or from its scalars) into the loop
    that uses it, and the C++ compiler does not hoist it: a trust ratio's float64 division and
    square roots ran for every 16 elements (Lamb: ~8% of its step at 1 thread).  A reduction's
    result is stored once instead, and inductor unrolls only reductions of fewer than 8
    elements: so this is the maximum over 16 copies of ``x`` (exactly ``x``, eagerly too).
    """
    return x.unsqueeze(-1).expand(*x.shape, 16).amax(-1)


class GradDivisor:
    """The ``grad_scale`` / ``found_inf`` pair :func:`~distopt.optim._kernel.apply` reads from an
    optimizer, with ``grad_scale`` multiplied by a divisor of the gradient (a device tensor)."""

    __slots__ = ("grad_scale", "found_inf")

    def __init__(self, grad_scale: Tensor | None, found_inf: Tensor | None):
        self.grad_scale, self.found_inf = grad_scale, found_inf


def grad_divided(opt: Any, divisor: Tensor | None) -> Any:
    """``opt`` for :func:`~distopt.optim._kernel.apply`, with every gradient also divided by
    ``divisor`` (a 0-dim device tensor; ``None``: ``opt`` itself)."""
    if divisor is None:
        return opt
    scale, found_inf = K.scaler_of(opt)
    return GradDivisor(divisor if scale is None else scale * divisor, found_inf)


def inv_grad_scale(opt: Any, device: torch.device) -> Tensor | None:
    """``1 / grad_scale`` (fp32, on ``device``) when ``GradScaler`` scaled this step's gradients."""
    scale, _ = K.scaler_of(opt)
    return None if scale is None else scale.to(device, torch.float32).reciprocal()


#: CPU gradients of at least this many elements get their sum of squares from ``torch.dot`` at
#: 1 thread (:func:`grad_sq_sums`), the others from one ``torch._foreach_norm``
DOT_MIN = 1 << 15


def grad_sq_sums(grads: list[Tensor], dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """``||g||^2`` of each of ``grads`` (0-dim ``dtype`` device tensors, in order).

    Contiguous float32 CPU gradients, where the native loop is available (compiled mode, see
    :mod:`distopt.optim._sqsum`): all in one call that reads each in 8 streams, summed in
    float64 (~1.5x the speed of a dot).  Otherwise, at 1 thread, large float32 CPU gradients go
    through ``torch.dot(g, g)`` (a BLAS dot: it reads ViT-S's 51 large gradients in ~7 ms where
    ``_foreach_norm``, whose CPU norm kernel runs AVX2 code, takes ~9 ms); everything else
    through one ``_foreach_norm``, its norms squared in ``dtype`` (float64: their exact
    squares).  No dots at more threads: MKL's threaded dot took ~200 ms for the same 51
    gradients at 2 threads on a loaded 2-core machine, where the norm kernel stays at ~12 ms;
    not on CUDA, where ``_foreach_norm`` is one fused multi-tensor kernel.  The sums agree to
    float32 rounding across these paths, not bit for bit.
    """
    out: list[Tensor | None] = [None] * len(grads)
    rest = list(range(len(grads)))
    if grads and _sqsum.available():
        native = [i for i in rest if _sqsum.eligible(grads[i])]
        if native:
            sq = _sqsum._sums([grads[i] for i in native]).to(dtype)
            for i, s in zip(native, sq.unbind(0)):
                out[i] = s
            if len(native) == len(grads):
                return out  # type: ignore[return-value]
            taken = set(native)
            rest = [i for i in rest if i not in taken]
    dot_ok = torch.get_num_threads() == 1
    small: list[int] = []
    for i in rest:
        g = grads[i]
        if (
            dot_ok
            and g.numel() >= DOT_MIN
            and g.device.type == "cpu"
            and g.dtype == torch.float32
            and g.is_contiguous()
        ):
            flat = g.view(-1)
            d = torch.dot(flat, flat)
            out[i] = d if dtype == torch.float32 else d.to(dtype)
        else:
            small.append(i)
    if small:
        norms = torch._foreach_norm([grads[i] for i in small])
        for i, sq in zip(small, torch.stack(norms).to(dtype).square().unbind(0)):
            out[i] = sq
    return out  # type: ignore[return-value]


def grad_norm(ctx: StepContext, views: list[ParamView]) -> Tensor:
    """The L2 norm of all gradients of ``views`` together, a float32 device tensor (Lamb's clip
    norm).

    One read of every gradient (:func:`grad_sq_sums`) and one sum per process group: the partial
    sums of sharded tensors are added across their group's ranks (one reduction per group),
    those of unsharded tensors counted once, as in
    :func:`distopt.optim._functional.global_grad_norm` (which adds them one tensor at a time).
    """
    # last to first: the optimizer then updates first the tensors whose gradients were read
    # last (still in the caches)
    grads = [v.grad for v in reversed(views)]
    sharded = any(v.sharded for v in views)
    if not sharded and _sqsum.available():
        packed = _sqsum.addresses(grads)  # None unless every gradient is eligible
        if packed is not None:
            # the common CPU case: one native call, float64 sums added in float64
            return _sqsum._sums(grads, packed).sum().sqrt().to(torch.float32)
    sq = grad_sq_sums(grads)[::-1]
    if not sharded:
        return torch.stack(sq).sum().sqrt()
    parts: dict[Any, tuple[ParamView, list[Tensor]]] = {}
    for s, v in zip(sq, views):
        parts.setdefault(id(v.group) if v.sharded else None, (v, []))[1].append(s)
    sums = [torch.stack(ss).sum() for _, ss in parts.values()]
    return ctx.sum_over(sums, [v for v, _ in parts.values()]).sqrt()


def squared_norms(
    ctx: StepContext | None, views: list[ParamView], *columns: list[Tensor]
) -> Tensor:
    """``out[i, k] = ||columns[k][i]||^2`` over the whole tensor of ``views[i]`` (float64).

    ``columns[k][i]``: view ``i``'s local values of statistic ``k`` (its parameter rows, its
    gradient rows, ...), summed in one native call per column when every tensor is a contiguous
    float32 CPU one and :mod:`distopt.optim._sqsum` is built, else by :func:`grad_sq_sums`
    (large float32 tensors: a float32 BLAS dot at 1 thread; the others: the exact square of
    ``_foreach_norm``'s norm); the partial sums of sharded
    views are added across their ranks in one :meth:`StepContext.reduce` (unsharded ones are
    counted once), so the result is the whole tensor's on every rank.
    """
    cols = [list(c) for c in columns]
    if _sqsum.available() and all(_sqsum.eligible(t) for c in cols for t in c):
        sq = torch.stack([_sqsum._sums(c) for c in cols], 1)  # one native call per column
    else:
        sq = torch.stack([torch.stack(grad_sq_sums(c, torch.float64)) for c in cols], 1)
    if any(v.sharded for v in views):
        if ctx is None:
            raise ValueError(
                "squared_norms: sharded views need the StepContext to add partial sums"
            )
        (rows,) = ctx.reduce([list(sq.unbind(0))], list(views))
        sq = torch.stack(rows)
    return sq
