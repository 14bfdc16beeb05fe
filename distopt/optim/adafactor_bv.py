"""Adafactor as Big Vision trains ViTs with it ("Scaling Vision Transformers", Zhai et al., 2022).

The optimizer of ``timm.optim.AdafactorBigVision`` (names ``adafactorbv``, ``adafactorbvc``,
``cadafactorbv``, ``cadafactorbvc``), with its signature and defaults; the cautious mask
(arXiv:2411.16085) and the corrected weight decay (arXiv:2506.02285) are options of the one class.

Sharding (dim-0 row slices; ZeRO-1/2 and FSDP2).  A tensor is factored over its two largest dims
``(dc, dr)`` (ties by index), chosen from the *global* shape.  The row statistic ``exp_avg_sq_r``
is the mean of ``g^2`` over ``dr``, the column statistic ``exp_avg_sq_c`` the mean over ``dc``,
and the row factor is normalised by the mean of ``exp_avg_sq_r`` over ``dc``.  A mean over a
dim other than 0 is local; a mean over dim 0 is a sum of local partial sums across the ranks, and
the statistic it gives is replicated (kept whole on every rank).  So:

* ``dr == 0`` (dim 0 the largest): ``exp_avg_sq_r`` is replicated, its partial sums are reduced;
* ``dc == 0`` (dim 0 the second largest): ``exp_avg_sq_c`` is replicated, and both its partial
  sums and those of the row normaliser (the sum of the local rows of ``exp_avg_sq_r``) are reduced;
* neither: everything is local (dim 0 is a batch dim of the statistics).

The update RMS (``clipping_threshold``) and the cautious mask's mean are whole-tensor.  A step of a
param group makes at most three ``ctx.reduce`` calls: the factored statistics, the update RMS (with
``clipping_threshold``) and the mask counts (with ``caution``); none when nothing is sharded.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from distopt.optim import _functional as F
from distopt.optim import _rule_factored as _rf
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import (
    HyperSpec,
    check_clip,
    flag,
    integer,
    lr,
    nonneg,
    option,
    with_max_lr_snapshot,
)

__all__ = ["AdafactorBigVision", "factored_dims"]

_MOMENTUM_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def factored_dims(
    shape: torch.Size | tuple[int, ...], min_dim_size_to_factor: int
) -> tuple[int, int] | None:
    """``(dc, dr)``: the second largest and the largest dim of ``shape`` (ties: the lower index
    first), or None (no factoring) when ``shape`` has < 2 dims or its second largest dim is
    smaller than ``min_dim_size_to_factor``."""
    if len(shape) < 2:
        return None
    (size_c, dc), (_, dr) = sorted((s, i) for i, s in enumerate(shape))[-2:]
    if size_c < min_dim_size_to_factor:
        return None
    return dc, dr


def _momentum_dtype(name: str, value: Any) -> torch.dtype:
    if isinstance(value, str) and value in _MOMENTUM_DTYPES:
        return _MOMENTUM_DTYPES[value]
    if isinstance(value, torch.dtype) and value in _MOMENTUM_DTYPES.values():
        return value
    raise ValueError(
        f"Invalid {name}: {value!r} (must be torch.float32, torch.bfloat16 or torch.float16, or "
        f"one of {sorted(_MOMENTUM_DTYPES)})"
    )


class AdafactorBigVision(DistOptimizer):
    r"""Big Vision's Adafactor, with the signature and defaults of ``timm.optim.AdafactorBigVision``.

    Update rule for step ``t`` of a parameter ``w`` with gradient ``g`` (``s = max(t - decay_offset, 1)``)::

        beta2 = min(beta2_cap, 1 - s^(-decay_rate))
        G2    = g^2 + eps        (eps None: 1e-30; the maths runs in fp32 for bf16/fp16 params)
        factored ((dc, dr): the second largest and the largest dim; both >= min_dim_size_to_factor):
            R <- lerp(R, mean_dr(G2), 1 - beta2)            (exp_avg_sq_r, keepdim)
            C <- lerp(C, mean_dc(G2), 1 - beta2)            (exp_avg_sq_c, keepdim)
            u  = g / sqrt(R / mean_dc(R)) / sqrt(C)
        else:
            V <- lerp(V, G2, 1 - beta2)                     (exp_avg_sq)
            u  = g / sqrt(V)
        u <- u / max(1, RMS(u) / clipping_threshold)        (when clipping_threshold is not None)
        m <- lerp(m, u, 1 - momentum);  u = m               (when momentum is not None; m kept in momentum_dtype)
        u <- u * cautious mask(u, g)                        (when caution, with momentum)
        w <- w * (1 - d * weight_decay)                     d = lr (lr^2 / max_lr with corrected_weight_decay);
                                                            unscaled_wd: d = 1 (lr / max_lr)
        w <- w - lr * u

    ``max_lr`` is the constructor's ``lr`` (``max_lr_snapshot`` in the param groups).  Sharded
    training gives single-process numbers: see the module docstring for the reductions.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1.0).
        min_dim_size_to_factor: factor only when the second largest dim is at least this (default 16).
        decay_rate: exponent of the second-moment schedule (default 0.8).
        decay_offset: steps the schedule is delayed by (default 0).
        beta2_cap: upper bound of ``beta2`` (default 0.999).
        momentum: first-moment coefficient; None disables it (default 0.9).
        momentum_dtype: dtype of the first moment, a torch dtype or its name (default torch.bfloat16).
        eps: added to the squared gradient; None: 1e-30 (timm takes 1e-7 for float16 maths, which
            distopt never runs: bf16/fp16 parameters are updated on an fp32 master) (default None).
        weight_decay: decoupled weight decay (default 0.0).
        clipping_threshold: bound of the update RMS; None disables the clip (default None).
        unscaled_wd: decay not scaled by the lr, as in Big Vision (default False).
        caution: the cautious mask; applied to the momentum, so without a momentum it has no
            effect, as in timm (default False).
        corrected_weight_decay: scale the decay by ``lr / max_lr`` as above (default False).

    State per parameter: ``step`` (float32 scalar), ``exp_avg_sq_r`` and ``exp_avg_sq_c``
    (factored; the parameter's shape with ``dr`` resp. ``dc`` of size 1) or ``exp_avg_sq``, and
    ``exp_avg`` (in ``momentum_dtype``) with a momentum.  The same names and shapes as timm's.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._rule_factored

    hypers = HyperSpec(
        lr(1.0),
        integer("min_dim_size_to_factor", 16, minimum=0),
        nonneg("decay_rate", 0.8),
        integer("decay_offset", 0, minimum=0),
        nonneg("beta2_cap", 0.999, at_most=1.0),
        nonneg("momentum", 0.9, below=1.0, optional=True),
        option("momentum_dtype", torch.bfloat16, "torch.dtype | str", _momentum_dtype),
        nonneg("eps", None, optional=True),
        nonneg("weight_decay", 0.0),
        option("clipping_threshold", None, "float | None", check_clip),
        flag("unscaled_wd", False),
        flag("caution", False),
        flag("corrected_weight_decay", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return params, with_max_lr_snapshot(hypers)

    # ------------------------------------------------------------------ state
    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        st = view.state
        st["step"] = self._step_tensor(view)
        dims = factored_dims(view.shape, group["min_dim_size_to_factor"])
        data = view.data
        if dims is None:
            st["exp_avg_sq"] = self._zeros(view)
        else:
            dc, dr = dims  # the local shape differs from the global one in dim 0 only
            st["exp_avg_sq_r"] = data.new_zeros(_keepdim(data.shape, dr))
            st["exp_avg_sq_c"] = data.new_zeros(_keepdim(data.shape, dc))
        if group["momentum"] is not None:
            st["exp_avg"] = torch.zeros_like(data, dtype=group["momentum_dtype"])

    def state_is_sharded(self, name: str, value: Any, param_shape: torch.Size) -> bool:
        """``exp_avg_sq_r`` / ``exp_avg_sq_c`` are replicated when they are means over dim 0
        (``dr == 0`` / ``dc == 0``); other tensor state is row-sharded; ``step`` is replicated."""
        if name in ("exp_avg_sq_r", "exp_avg_sq_c") and len(param_shape) >= 2:
            dc, dr = factored_dims(param_shape, 0)  # type: ignore[misc]
            if (dr if name == "exp_avg_sq_r" else dc) == 0:
                return False
        return super().state_is_sharded(name, value, param_shape)

    # ------------------------------------------------------------------ the update
    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        momentum, mdtype = group["momentum"], group["momentum_dtype"]
        threshold, wd = group["clipping_threshold"], group["weight_decay"]
        steps = F.advance_steps(views)
        dims = [factored_dims(v.shape, group["min_dim_size_to_factor"]) for v in views]
        if momentum is not None:
            for v in views:  # load_state_dict casts state to the param's dtype
                if v.state["exp_avg"].dtype != mdtype:
                    v.state["exp_avg"] = v.state["exp_avg"].to(mdtype)
        decay = 1.0
        if wd != 0.0:
            max_lr = group["max_lr_snapshot"] if group["corrected_weight_decay"] else None
            if group["unscaled_wd"]:
                scale = 1.0 if max_lr is None else lr / max_lr
            else:
                scale = lr if max_lr is None else lr * lr / max_lr
            decay = 1.0 - scale * wd
        m = 0.0 if momentum is None else momentum
        packs = []
        made: dict[tuple, list[float]] = {}  # equal packs are one object (see _rf.run)
        for v, t, d in zip(views, steps, dims):
            key = (t, v.shape, d, v.data.dtype)
            values = made.get(key)
            if values is None:
                w2 = 1.0 - min(
                    group["beta2_cap"],
                    1.0 - max(t - group["decay_offset"], 1) ** (-group["decay_rate"]),
                )
                n_c, n_r = (v.shape[d[0]], v.shape[d[1]]) if d is not None else (1, 1)
                values = made[key] = _rf.pack(
                    w2=w2,
                    eps=_eps(group["eps"], v),
                    n_r=n_r,
                    n_c=n_c,
                    b1=m,
                    w1=1.0 - m,
                    lr=lr,
                    decay=decay,
                    numel=max(v.numel, 1),
                    root_n=math.sqrt(max(v.numel, 1)),
                    clip=0.0 if threshold is None else threshold,
                )
            packs.append(values)
        opts = _rf.Options(
            flavour="bv",
            psq=False,
            scale=False,
            clip=threshold is not None,
            momentum=momentum is not None,
            caution=bool(group["caution"]) and momentum is not None,
            decay=wd != 0.0,
        )
        lays = [_rf.layout(v.data.shape, d, v.sharded) for v, d in zip(views, dims)]
        _rf.run(
            self,
            views,
            lays,
            packs,
            ctx,
            opts,
            state_names=("exp_avg_sq_r", "exp_avg_sq_c", "exp_avg_sq"),
        )


def _keepdim(shape: torch.Size, dim: int) -> list[int]:
    out = list(shape)
    out[dim] = 1
    return out


def _eps(eps: float | None, view: ParamView) -> float:
    """The eps of one parameter: the group's, or timm's pick by the dtype the maths runs in
    (float32 for bf16/fp16 parameters, whose update runs on the fp32 master: 1e-30)."""
    if eps is not None:
        return eps
    return 1e-7 if view.data.dtype == torch.float16 else 1e-30
