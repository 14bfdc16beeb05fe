"""Small shared pieces the optimizers are composed of (in the spirit of optax).

Every function works on lists of local tensors with ``torch._foreach_*`` kernels.  Functions
that need statistics of a *whole* parameter (norms, trust ratios, RMS) take a
:class:`~distopt.optim._core.StepContext` and the list of views, and reduce their partial sums
through it, so the same code is exact on one process, under ZeRO and under FSDP2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from distopt.optim import _step_counts
from distopt.optim._core import ParamView, StepContext

# --------------------------------------------------------------------------- steps, moments


def columns(views: Sequence[ParamView], *state_names: str) -> tuple[list[Tensor], ...]:
    """``(datas, grads, *states)`` of ``views``: one list per column, a state list per name."""
    return (
        [v.data for v in views],
        [v.grad for v in views],
        *([v.state[name] for v in views] for name in state_names),
    )


def advance_steps(views: Sequence[ParamView]) -> list[float]:
    """Increment each parameter's ``step`` counter and return the new values as floats.

    The counters of views advanced together are kept as views of one buffer: one op per step
    and no tensor read per counter (see :mod:`distopt.optim._step_counts`)."""
    return _step_counts.advance(views)


def bias_correction(beta: float, steps: Sequence[float]) -> list[float]:
    """``1 - beta**t`` for each step count ``t``."""
    return [1.0 - beta**t for t in steps]


def ema_(avgs: list[Tensor], values: list[Tensor], beta: float, weight: float | None = None) -> None:
    """``avg = beta * avg + weight * value`` (``weight`` defaults to ``1 - beta``)."""
    if not avgs:
        return
    if weight is None or weight == 1.0 - beta:
        torch._foreach_lerp_(avgs, values, 1.0 - beta)
    else:
        torch._foreach_mul_(avgs, beta)
        torch._foreach_add_(avgs, values, alpha=weight)


def ema_sq_(avgs: list[Tensor], values: list[Tensor], beta: float, weight: float | None = None) -> None:
    """``avg = beta * avg + weight * value**2`` (``weight`` defaults to ``1 - beta``)."""
    if not avgs:
        return
    torch._foreach_mul_(avgs, beta)
    torch._foreach_addcmul_(avgs, values, values, value=(1.0 - beta) if weight is None else weight)


def scaled(tensors: list[Tensor], scales: Sequence[float] | float) -> list[Tensor]:
    """New tensors ``t * s`` (one scale per tensor, or one for all)."""
    if not tensors:
        return []
    return torch._foreach_mul(tensors, scales if not isinstance(scales, Sequence) else list(scales))


def adam_denominator(exp_avg_sqs: list[Tensor], bc2: Sequence[float], eps: float) -> list[Tensor]:
    """``sqrt(v / bc2) + eps`` as new tensors (``eps`` outside the square root, as in Adam)."""
    if not exp_avg_sqs:
        return []
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(b) for b in bc2])
    torch._foreach_add_(denom, eps)
    return denom


def amsgrad_max_(max_sqs: list[Tensor], exp_avg_sqs: list[Tensor]) -> list[Tensor]:
    """Keep the running element-wise maximum of the second moment (AMSGrad); returns it."""
    if max_sqs:
        torch._foreach_maximum_(max_sqs, exp_avg_sqs)
    return max_sqs


def fused_adam_ok(params: Sequence[Tensor]) -> bool:
    """Whether torch's fused Adam/AdamW kernels take these tensors (one CPU/CUDA device, one
    fp32/fp64 dtype)."""
    dev, dtype = params[0].device, params[0].dtype
    return (
        dev.type in ("cpu", "cuda")
        and dtype in (torch.float32, torch.float64)
        and all(p.device == dev and p.dtype == dtype for p in params)
    )


# --------------------------------------------------------------------------- weight decay


def decoupled_decay_(params: list[Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled weight decay (Loshchilov & Hutter): ``p = p * (1 - lr * wd)``."""
    if params and weight_decay != 0.0 and lr != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)


def l2_decay(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    """Classic L2 regularisation folded into the gradient: ``g + wd * p`` (new tensors)."""
    if weight_decay == 0.0 or not grads:
        return list(grads)
    return torch._foreach_add(grads, params, alpha=weight_decay)


# --------------------------------------------------------------------------- norms and ratios


def local_sumsq(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor sum of squares of the local values (fp32 0-dim tensors)."""
    if not tensors:
        return []
    norms = torch._foreach_norm(list(tensors), 2)
    return [n.float() * n.float() for n in norms]


def device_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values, dtype)`` on ``device`` without waiting for it: on CUDA the values
    go through pinned memory in a non-blocking copy (``torch.tensor(..., device="cuda")``
    copies from pageable memory and synchronises the stream)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def global_norms(ctx: StepContext, views: Sequence[ParamView], *lists: Sequence[Tensor]) -> list[list[Tensor]]:
    """Per-parameter L2 norms of each of ``lists`` over the *whole* parameter, one reduction.

    ``lists[k][i]`` is the local part (same rows as ``views[i]``) of quantity ``k``.
    """
    parts = [local_sumsq(lst) for lst in lists]
    reduced = ctx.reduce(parts, list(views))
    return [[s.clamp_min(0).sqrt() for s in lst] for lst in reduced]


def trust_ratio(w_norm: Tensor, u_norm: Tensor, trust_clip: bool = False) -> Tensor:
    """LAMB/LARS trust ratio ``||w|| / ||u||``; 1 where either norm is zero; optionally <= 1."""
    one = torch.ones_like(w_norm)
    ratio = torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, one), one)
    if trust_clip:
        ratio = torch.clamp(ratio, max=1.0)
    return ratio


def global_grad_norm(ctx: StepContext, views: Sequence[ParamView]) -> Tensor:
    """L2 norm of all gradients of ``views`` taken together (one reduction when sharded).

    Sharded parameters contribute local partial sums that are summed across ranks; the
    partial sum of unsharded parameters is counted once.
    """
    sumsq = local_sumsq([v.grad for v in views])
    if not sumsq:
        return torch.zeros(())
    return ctx.sum_over(sumsq, views).sqrt()


def rms(ctx: StepContext, views: Sequence[ParamView], tensors: Sequence[Tensor]) -> list[Tensor]:
    """Root-mean-square of each whole parameter-shaped tensor (one reduction when sharded)."""
    (norms,) = global_norms(ctx, views, tensors)
    return [n / math.sqrt(max(v.numel, 1)) for n, v in zip(norms, views)]
