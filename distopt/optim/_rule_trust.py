"""Rule pieces of the trust-ratio optimizers (Lamb, Lars) and per-tensor gradient divisors.

* :func:`trust_ratio`: ``||w|| / ||u||`` inside a rule, from the whole-tensor sums of squares
  that :func:`distopt.optim._kernel.apply` delivers in ``s`` (``sums=``), 1 where either is 0.
* :func:`grad_divided`: what :func:`~distopt.optim._kernel.apply` should see as the optimizer
  when every gradient is also to be divided by a device tensor (Lamb's global clip factor,
  NvNovoGrad's per-tensor denominator): ``apply`` multiplies the gradient by ``1 / grad_scale``
  inside its kernels (both phases) and keeps ``GradScaler``'s ``found_inf``, so the divisor
  costs no pass over memory and no host read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.optim import _kernel as K

__all__ = ["trust_ratio", "grad_divided", "GradDivisor", "inv_grad_scale"]


def trust_ratio(w_sq: Tensor, u_sq: Tensor, clip: bool) -> Tensor:
    """``sqrt(w_sq) / sqrt(u_sq)``; 1 where either sum of squares is 0; ``min(r, 1)`` if ``clip``."""
    w, u = w_sq.clamp_min(0).sqrt(), u_sq.clamp_min(0).sqrt()
    r = torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
    return torch.clamp(r, max=1.0) if clip else r


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
