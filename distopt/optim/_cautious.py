"""The cautious mask (Liang et al., 2024, "Cautious Optimizers", arXiv:2411.16085).

An update direction ``u`` is applied only where it agrees in sign with the gradient ``g``:
``m = 1[u * g > 0]``, rescaled by the fraction of the tensor it keeps, ``m / max(mean(m), 1e-3)``.
The mean is over the *whole* parameter, so under row sharding it is one batched reduction of
the local counts (:meth:`StepContext.reduce`); the rest is element-wise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from distopt.optim._core import ParamView, StepContext

__all__ = ["cautious_masks"]


def cautious_masks(
    ctx: StepContext, views: Sequence[ParamView], updates: Sequence[Tensor], grads: Sequence[Tensor]
) -> list[Tensor]:
    """``1[u * g > 0] / max(mean over the whole tensor, 1e-3)`` for each parameter (new tensors)."""
    if not updates:
        return []
    masks = [(u * g > 0).to(u.dtype) for u, g in zip(updates, grads)]
    counts = [m.sum(dtype=torch.float32).reshape(1) for m in masks]
    (counts,) = ctx.reduce([counts], list(views))
    for m, c, v in zip(masks, counts, views):
        mean = (c.reshape(()) / max(v.numel, 1)).clamp_(min=1e-3)
        m.div_(mean.to(m.dtype))
    return masks
