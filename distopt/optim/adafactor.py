"""Adafactor: adaptive learning rates with sublinear memory cost (Shazeer & Stern, 2018).

One kernel, two documented flavours:

* :class:`Adafactor` has the signature and defaults of ``transformers.Adafactor``: every tensor
  with >= 2 dims has its second moment factored over its last two dims; the parameter-scale
  factor also multiplies an external lr.
* :class:`AdafactorTimm` has the signature and defaults of ``timm.optim.Adafactor``: a tensor is
  factored over dims (0, 1) when it has > 2 dims and both leading dims are larger than
  ``min_dim_size_to_factor`` (convolution kernels), else over its last two dims when both are
  larger than it; the relative step is used exactly when ``lr`` is None and the parameter-scale
  factor applies only to it; optional cautious masking.

Sharding (dim-0 row slices): with factoring dims ``(a, b)`` (``a < b``; ``b`` is never 0), the
row statistic (mean over ``b``) is always local.  The column statistic (mean over ``a``) and
the normaliser of the row statistic (its mean over ``a``) are local when ``a > 0`` (dim 0 is then
a batch dim of the factored moments) and need a sum across ranks when ``a == 0``.  The parameter
RMS (for ``scale_parameter``) and the update RMS (for ``clip_threshold``) are whole-tensor.
A step of a param group makes one ``ctx.reduce`` call for the first group of statistics
(column sums, row-normaliser sums, parameter sums of squares), one for the update sums of squares
and, with ``caution``, one for the mask sums.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _rule_factored as _rf
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import HyperSpec, check_nonneg, flag, integer, lr, nonneg, option

__all__ = ["Adafactor", "AdafactorTimm", "relative_step_lr"]


def relative_step_lr(step: float, warmup_init: bool = False) -> float:
    """Adafactor's relative step size (before any parameter-scale factor).

    ``min(1e-6 * step if warmup_init else 1e-2, 1 / sqrt(step))`` where ``step`` counts
    optimizer steps starting at 1 (the step being taken).  At ``step == 0`` the second term is
    taken as infinite, so the result is ``0.0`` (warmup_init) or ``1e-2``.  The Adafactor
    schedule of :mod:`distopt.schedules` evaluates this same function
    (``distopt.schedules.adafactor_relative_step_lr``).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    min_step = 1e-6 * step if warmup_init else 1e-2
    if step == 0:
        return float(min_step)
    return min(min_step, 1.0 / math.sqrt(step))


class _Hyper(NamedTuple):
    lr: float | None  # external lr (None with the relative step)
    relative_step: bool
    warmup_init: bool
    scale_parameter: bool  # the parameter-scale factor multiplies the relative step
    scale_external: bool  # ... and also an external lr (transformers) or not (timm)
    eps_sq: float
    eps_scale: float
    clip_threshold: float
    decay_rate: float
    beta1: float | None
    weight_decay: float
    caution: bool
    min_dim: int | None  # None: factor the last two dims of every >= 2-D tensor (transformers)


def _factor_dims(shape: torch.Size, min_dim: int | None) -> tuple[int, int] | None:
    """The dims ``(a, b)``, ``a < b``, the second moment is factored over, or None."""
    nd = len(shape)
    if min_dim is None:
        return (nd - 2, nd - 1) if nd >= 2 else None
    if nd > 2 and shape[0] > min_dim and shape[1] > min_dim:
        return 0, 1
    if nd >= 2 and shape[-2] > min_dim and shape[-1] > min_dim:
        return nd - 2, nd - 1
    return None


def _drop(shape: torch.Size, dim: int) -> torch.Size:
    return torch.Size(shape[:dim] + shape[dim + 1 :])


def _decay_rate(name: str, value: Any) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value > 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be finite and <= 0)")
    return value


def _clip_threshold(name: str, value: Any) -> Any:
    check_nonneg(value, name)
    if value == 0.0:
        raise ValueError(f"Invalid {name}: 0 (must be > 0)")
    return value


def _beta(name: str, value: Any) -> Any:
    if value is not None and (
        not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= value < 1.0)
    ):
        raise ValueError(f"Invalid {name}: {value!r} (must be None or in [0, 1))")
    return value


def _eps_pair(name: str, value: Any) -> Any:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"{name} must be a pair (eps for the squared gradient, eps for the scale), got {value!r}"
        )
    check_nonneg(value[0], f"{name}[0]")
    check_nonneg(value[1], f"{name}[1]")
    return tuple(value)


def _timm_betas(name: str, value: Any) -> Any:
    if value is not None:
        if not isinstance(value, (tuple, list)) or len(value) not in (1, 2):
            raise ValueError(f"{name} must be None or a tuple (beta1, beta2), got {value!r}")
        _beta(f"{name}[0]", value[0])
    return value


class _AdafactorKernel(DistOptimizer):
    """The Adafactor update shared by both flavours; subclasses map their groups to _Hyper."""

    #: the timm flavour writes the relative-step lr it used into ``group["lr"]``
    _writes_group_lr = False
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._rule_factored

    def _hyper(self, group: dict[str, Any]) -> _Hyper:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ lr
    @staticmethod
    def _param_lr(h: _Hyper, step: float, rms: float) -> float:
        if h.relative_step:
            lr = relative_step_lr(step, h.warmup_init)
            scale = h.scale_parameter
        else:
            lr = float(h.lr)  # type: ignore[arg-type]
            scale = h.scale_parameter and h.scale_external
        return lr * max(h.eps_scale, rms) if scale else lr

    def relative_step_lrs(self) -> list[float | None]:
        """The learning rate each param group used at its last step (one entry per group).

        For each group: the lr applied to the group's first parameter that has optimizer state,
        at its latest step (what transformers' ``AdafactorSchedule`` reports), computed with the
        same function as the update (:func:`relative_step_lr` times the parameter-scale factor).
        ``None`` for a group that has not taken a step yet (``AdafactorSchedule`` then reports
        its ``initial_lr``).  Under sharding the parameter RMS is the global one, so every rank
        reports the same values.
        """
        out: list[float | None] = []
        for group in self.param_groups:
            st = next(
                (self.state[p] for p in group["params"] if "step" in self.state.get(p, {})), None
            )
            if st is None:
                out.append(None)
            else:
                out.append(self._param_lr(self._hyper(group), float(st["step"]), float(st["RMS"])))
        return out

    # ------------------------------------------------------------------ state
    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        h = self._hyper(group)
        data = view.data
        st = view.state
        st["step"] = self._step_tensor(view)
        st["RMS"] = torch.zeros((), dtype=torch.float32, device=data.device)
        if h.beta1 is not None:
            st["exp_avg"] = self._zeros(view)
        dims = _factor_dims(view.shape, h.min_dim)
        if dims is None:
            st["exp_avg_sq"] = self._zeros(view)
        else:
            a, b = dims  # b > 0, so the local shape minus b keeps the local rows
            st["exp_avg_sq_row"] = data.new_zeros(_drop(data.shape, b))
            # minus a: the local rows when a > 0; the global trailing shape (replicated) when a == 0
            st["exp_avg_sq_col"] = data.new_zeros(_drop(data.shape, a))

    def _col_dim_is_zero(self, param_shape: torch.Size, value: Tensor) -> bool | None:
        """Whether ``exp_avg_sq_col`` of a parameter is the mean over dim 0 (None: unknown)."""
        answers = set()
        for group in self.param_groups:
            dims = _factor_dims(param_shape, self._hyper(group).min_dim)
            if dims is not None:
                answers.add(dims[0] == 0)
        if len(answers) == 1:
            return answers.pop()
        if not answers:
            return None
        # groups disagree (different min_dim_size_to_factor): the replicated column statistic has
        # exactly the parameter's trailing shape
        return tuple(value.shape) == tuple(param_shape[1:])

    def state_is_sharded(self, name: str, value: Any, param_shape: torch.Size) -> bool:
        """Row statistics, ``exp_avg`` and unfactored moments are row-sharded; ``exp_avg_sq_col``
        is replicated when it is the mean over dim 0 (every 2-D parameter; timm's (0, 1)
        factoring of >2-D kernels); scalars (``step``, ``RMS``) are replicated."""
        if name == "exp_avg_sq_col" and isinstance(value, Tensor) and len(param_shape) >= 2:
            if self._col_dim_is_zero(torch.Size(param_shape), value):
                return False
        return super().state_is_sharded(name, value, param_shape)

    # ------------------------------------------------------------------ the update
    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        h = self._hyper(group)
        steps = F.advance_steps(views)
        dims = [_factor_dims(v.shape, h.min_dim) for v in views]
        b1 = 0.0 if h.beta1 is None else h.beta1
        if h.relative_step:
            scale = h.scale_parameter
        else:
            scale = h.scale_parameter and h.scale_external
        packs = []
        made: dict[tuple, list[float]] = {}  # equal packs are one object (see _rf.run)
        for v, t, d in zip(views, steps, dims):
            key = (t, v.shape, d)
            values = made.get(key)
            if values is None:
                beta2t = 1.0 - math.pow(t, h.decay_rate)
                n_c, n_r = (v.shape[d[0]], v.shape[d[1]]) if d is not None else (1, 1)
                base = relative_step_lr(t, h.warmup_init) if h.relative_step else float(h.lr)  # type: ignore[arg-type]
                values = made[key] = _rf.pack(
                    w2=1.0 - beta2t,
                    b2=beta2t,
                    eps=h.eps_sq,
                    n_r=n_r,
                    n_c=n_c,
                    b1=b1,
                    w1=1.0 - b1,
                    lr=base,
                    numel=max(v.numel, 1),
                    root_n=math.sqrt(max(v.numel, 1)),
                    clip=h.clip_threshold,
                    wd=h.weight_decay,
                    eps_scale=h.eps_scale,
                )
            packs.append(values)
        opts = _rf.Options(
            flavour="hf",
            psq=True,
            scale=scale,
            clip=True,
            momentum=h.beta1 is not None,
            caution=h.caution and h.beta1 is not None,
            decay=h.weight_decay != 0.0,
        )
        lays = [_rf.layout(v.data.shape, d, v.sharded) for v, d in zip(views, dims)]
        lrs = _rf.run(
            self,
            views,
            lays,
            packs,
            ctx,
            opts,
            state_names=("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"),
        )
        if self._writes_group_lr and h.relative_step:
            # as timm: the lr of the group's last parameter (a 0-dim tensor when it depends on
            # the parameter RMS)
            group["lr"] = lrs[-1] if scale else relative_step_lr(steps[-1], h.warmup_init)


class Adafactor(_AdafactorKernel):
    r"""Adafactor with the signature and defaults of ``transformers.Adafactor``.

    Update rule for step ``t`` of a parameter ``w`` with gradient ``g``::

        rho   = min(1e-6 * t if warmup_init else 1e-2, 1 / sqrt(t))   if relative_step, else lr
        alpha = rho * max(eps[1], RMS(w))  if scale_parameter, else rho
        beta2 = 1 - t^decay_rate
        G2    = g^2 + eps[0]
        >= 2-D tensors (factored over the last two dims; dim -2 "rows", dim -1 "columns"):
            R <- beta2 * R + (1 - beta2) * mean_{-1}(G2)          (exp_avg_sq_row)
            C <- beta2 * C + (1 - beta2) * mean_{-2}(G2)          (exp_avg_sq_col)
            V  = (R / mean(R)) outer C
        other tensors:
            V <- beta2 * V + (1 - beta2) * G2                     (exp_avg_sq)
        u = g / sqrt(V)
        u <- alpha * u / max(1, RMS(u) / clip_threshold)
        m <- beta1 * m + (1 - beta1) * u;  u = m                  (only when beta1 is not None)
        w <- w - weight_decay * alpha * w - u

    Args:
        params: parameters or param groups.
        lr: external learning rate; must be None with ``relative_step=True`` (default None).
        eps: (eps added to the squared gradient, lower bound of the parameter scale)
            (default (1e-30, 1e-3)).
        clip_threshold: threshold of the update RMS (default 1.0).
        decay_rate: exponent of the second-moment decay ``1 - t^decay_rate`` (default -0.8).
        beta1: first-moment coefficient; None disables the first moment (default None).
        weight_decay: weight decay, scaled by the step size (default 0.0).
        scale_parameter: multiply the step size by the parameter RMS (default True).
        relative_step: compute a time-dependent step size instead of using ``lr`` (default True).
        warmup_init: linear warm-up of the relative step (default False).

    State per parameter: ``step`` (float32 scalar), ``RMS`` (float32 scalar, the parameter RMS
    of the last step), ``exp_avg_sq_row`` and ``exp_avg_sq_col`` (factored) or ``exp_avg_sq``,
    and ``exp_avg`` with beta1.  :meth:`relative_step_lrs` gives the lr of each group.
    """

    hypers = HyperSpec(
        lr(None, optional=True),
        option("eps", (1e-30, 1e-3), "tuple[float, float]", _eps_pair),
        option("clip_threshold", 1.0, "float", _clip_threshold),
        option("decay_rate", -0.8, "float", _decay_rate),
        option("beta1", None, "float | None", _beta),
        nonneg("weight_decay", 0.0),
        flag("scale_parameter", True),
        flag("relative_step", True),
        flag("warmup_init", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if hypers["lr"] is not None and hypers["relative_step"]:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if hypers["warmup_init"] and not hypers["relative_step"]:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        if hypers["lr"] is None and not hypers["relative_step"]:
            raise ValueError("`relative_step=False` requires an external `lr`")
        return params, hypers

    def _hyper(self, group: dict[str, Any]) -> _Hyper:
        return _Hyper(
            lr=group["lr"],
            relative_step=group["relative_step"],
            warmup_init=group["warmup_init"],
            scale_parameter=group["scale_parameter"],
            scale_external=True,
            eps_sq=group["eps"][0],
            eps_scale=group["eps"][1],
            clip_threshold=group["clip_threshold"],
            decay_rate=group["decay_rate"],
            beta1=group["beta1"],
            weight_decay=group["weight_decay"],
            caution=False,
            min_dim=None,
        )


class AdafactorTimm(_AdafactorKernel):
    r"""Adafactor with the signature and defaults of ``timm.optim.Adafactor``.

    The update is :class:`Adafactor`'s with these differences:

    * the relative step is used exactly when ``lr`` is None; ``scale_parameter`` and
      ``warmup_init`` apply only to it (an external lr is used as given).  With the relative step
      the lr of the group's last updated parameter is written to ``group["lr"]``, as timm does;
    * factoring dims: ``(0, 1)`` for tensors with > 2 dims whose dims 0 and 1 are both larger
      than ``min_dim_size_to_factor`` (convolution kernels: out x in channels), else the last two
      dims when both are larger than it, else no factoring;
    * ``betas``: only ``betas[0]`` is used (the first-moment coefficient; None disables it);
    * ``caution``: mask the update where the first moment and the gradient disagree in sign,
      rescaled by ``1 / max(mean(mask), 1e-3)`` (only with ``betas``; without a first moment it
      has no effect, as in timm).

    Args:
        params: parameters or param groups.
        lr: external learning rate; None selects the relative step (default None).
        eps: added to the squared gradient (default 1e-30).
        eps_scale: lower bound of the parameter scale (default 1e-3).
        clip_threshold: threshold of the update RMS (default 1.0).
        decay_rate: exponent of the second-moment decay (default -0.8).
        betas: (beta1, unused) or None (default None).
        weight_decay: weight decay, scaled by the step size (default 0.0).
        scale_parameter: multiply the relative step by the parameter RMS (default True).
        warmup_init: linear warm-up of the relative step (default False).
        min_dim_size_to_factor: factor only dims larger than this (default 16).
        caution: cautious masking (default False).

    State: as :class:`Adafactor`.
    """

    _writes_group_lr = True

    hypers = HyperSpec(
        lr(None, optional=True),
        nonneg("eps", 1e-30),
        nonneg("eps_scale", 1e-3),
        option("clip_threshold", 1.0, "float", _clip_threshold),
        option("decay_rate", -0.8, "float", _decay_rate),
        option("betas", None, "tuple[float, float] | None", _timm_betas),
        nonneg("weight_decay", 0.0),
        flag("scale_parameter", True),
        flag("warmup_init", False),
        integer("min_dim_size_to_factor", 16, minimum=0),
        flag("caution", False),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The relative step is used exactly when ``lr`` is None; only ``betas[0]`` is kept."""
        relative_step = hypers["lr"] is None
        if hypers["warmup_init"] and not relative_step:
            raise ValueError("warmup_init requires relative_step=True (lr=None)")
        out = {k: v for k, v in hypers.items() if k != "betas"}
        out["beta1"] = None if hypers["betas"] is None else hypers["betas"][0]
        out["relative_step"] = relative_step
        return params, out

    def _hyper(self, group: dict[str, Any]) -> _Hyper:
        return _Hyper(
            lr=group["lr"],
            relative_step=group["relative_step"],
            warmup_init=group["warmup_init"],
            scale_parameter=group["scale_parameter"],
            scale_external=False,
            eps_sq=group["eps"],
            eps_scale=group["eps_scale"],
            clip_threshold=group["clip_threshold"],
            decay_rate=group["decay_rate"],
            beta1=group["beta1"],
            weight_decay=group["weight_decay"],
            caution=group["caution"],
            min_dim=group["min_dim_size_to_factor"],
        )
