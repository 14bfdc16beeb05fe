"""AdamWeightDecay: the PyTorch form of transformers' TensorFlow ``AdamWeightDecay`` optimizer.

Keras' Adam (``epsilon`` added to ``sqrt(v)`` before the bias correction of the step size) with
the weights decayed by ``lr * weight_decay`` *before* the Adam update, for the parameters whose
names pass the include/exclude regular expressions, plus Keras' gradient clipping options.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import (
    KW_ONLY,
    HyperSpec,
    adam_hypers,
    check_clip,
    flag,
    option,
)

__all__ = ["AdamWeightDecay"]


@functools.lru_cache(maxsize=65536)
def _use_weight_decay(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """transformers' rule: an ``include`` match decays; else an ``exclude`` match does not; else decay."""
    if any(re.search(r, name) is not None for r in include):
        return True
    return not any(re.search(r, name) is not None for r in exclude)


def _patterns(what: str, value: Any) -> tuple[str, ...]:
    """Regular expressions, stored as a tuple (``()`` for None; a lone string is one pattern)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    out = tuple(value)
    for r in out:
        if not isinstance(r, str):
            raise TypeError(f"{what} must be a list of regular expressions (str), got {r!r}")
        try:
            re.compile(r)
        except re.error as e:
            raise ValueError(f"invalid regular expression {r!r} in {what}: {e}") from e
    return out


def _names(what: str, value: Any) -> Any:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping name -> tensor, e.g. dict(model.named_parameters())")
    return value


class AdamWeightDecay(DistOptimizer):
    r"""transformers' (TensorFlow) ``AdamWeightDecay`` for PyTorch parameters.

    Update rule for step ``t`` (element-wise once the gradient is clipped)::

        g  <- clip(g, -clipvalue, clipvalue)                         if clipvalue
        g  <- g * clipnorm / max(||g||, clipnorm)                    if clipnorm (per tensor)
        g  <- g * global_clipnorm / max(||all g||, global_clipnorm)  if global_clipnorm
        p  <- p - lr * weight_decay * p          # decay FIRST, only for parameters selected by name
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        v' <- max(v', v)  if amsgrad else v
        p  <- p - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v') + eps)

    ``eps`` is Keras' "epsilon hat": it is added to ``sqrt(v')`` *before* the bias corrections,
    which are folded into the step size (so its effect differs from torch's Adam at equal value).

    **Which parameters are decayed.**  As in transformers, a parameter is decayed when
    ``weight_decay != 0`` and its name matches (``re.search``) a pattern of
    ``include_in_weight_decay``, or else matches no pattern of ``exclude_from_weight_decay``.
    PyTorch tensors have no names, so names come from the ``params`` argument: pass a module
    (its ``named_parameters()`` are used), ``model.named_parameters()`` (``(name, tensor)``
    pairs, also inside param-group dicts), or plain tensors together with
    ``param_names=dict(model.named_parameters())``.  Names are the module's dotted parameter
    names (``encoder.layer.0.attention.self.query.weight``), not TensorFlow variable names
    (``.../kernel:0``): write the patterns for them (e.g. ``["LayerNorm", "layer_norm", "bias"]``
    works for both).  Names are resolved when a group is added and kept, position by position,
    in the group's ``param_names`` list (the same key ``torch.optim`` uses).  Giving patterns
    without names raises a ValueError.

    **Clipping.**  ``clipvalue``, ``clipnorm`` (per tensor) and ``global_clipnorm`` (over all
    the gradients of the step, every group) follow Keras, in that order; ``clipnorm`` and
    ``global_clipnorm`` exclude each other.  Norms are of whole parameters: under sharding
    their partial sums are summed in one batched reduction (per group for ``clipnorm``, once
    per step for ``global_clipnorm``).  ``global_clipnorm`` is optimizer-wide: the constructor
    value applies.  Without clipping the optimizer is purely element-wise.

    Differences to TensorFlow: the step count is per parameter (Keras counts optimizer steps,
    so a variable that skips a step still advances its bias corrections); Keras' legacy
    ``decay`` (inverse-time lr decay) is not supported, use a schedule.

    Args:
        params: a module, ``(name, tensor)`` pairs, tensors, or param groups of either.
        lr: learning rate (default 1e-3; TF ``learning_rate``).
        betas: coefficients of the running averages (default (0.9, 0.999); TF ``beta_1``, ``beta_2``).
        eps: Keras' epsilon (default 1e-7; TF ``epsilon``).
        weight_decay: decay rate (default 0; TF ``weight_decay_rate``).
        amsgrad: use the AMSGrad maximum of the second moment (default False).
        include_in_weight_decay: regular expressions of names always decayed (default None).
        exclude_from_weight_decay: regular expressions of names never decayed unless included
            (default None).
        clipnorm: clip each gradient to this L2 norm (default None).
        clipvalue: clip each gradient element to ``[-clipvalue, clipvalue]`` (default None).
        global_clipnorm: clip all gradients together to this L2 norm (default None).
        param_names: mapping ``name -> tensor`` (e.g. ``dict(model.named_parameters())``) used to
            name tensors given without names (default None).

    State per parameter: ``step`` (float32 scalar), ``exp_avg`` (Keras slot ``m``),
    ``exp_avg_sq`` (``v``) and, with amsgrad, ``max_exp_avg_sq`` (``vhat``); fp32 for bf16/fp16
    parameters.
    """

    elementwise = True  # unless clipnorm / global_clipnorm (see needs_whole_tensors)
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: see distopt.optim._kernel

    def needs_whole_tensors(self, group: dict[str, Any]) -> bool:
        """``clipnorm`` and ``global_clipnorm`` clip by norms of whole gradients."""
        return group.get("clipnorm") is not None or group.get("global_clipnorm") is not None

    hypers = HyperSpec(
        *adam_hypers(1e-3, eps_default=1e-7),
        flag("amsgrad", False),
        option("include_in_weight_decay", None, "Sequence[str] | None", _patterns),
        option("exclude_from_weight_decay", None, "Sequence[str] | None", _patterns),
        option("clipnorm", None, "float | None", check_clip),
        option("clipvalue", None, "float | None", check_clip),
        option("global_clipnorm", None, "float | None", check_clip),
        KW_ONLY,
        option("param_names", None, "Mapping[str, Tensor] | None", _names),
        params_annotation="Iterable | nn.Module",
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Resolve ``param_names`` (a constructor argument, not a group entry) and modules."""
        if hypers["clipnorm"] is not None and hypers["global_clipnorm"] is not None:
            raise ValueError("clipnorm and global_clipnorm cannot both be set (as in Keras)")
        defaults = dict(hypers)
        names = defaults.pop("param_names") or {}
        self._name_lookup: dict[int, str] = {id(t): n for n, t in names.items()}
        if isinstance(params, nn.Module):
            params = list(params.named_parameters())
        return params, defaults

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_name_lookup", {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; ``(name, tensor)`` pairs or a module give the names (see the class doc)."""
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, nn.Module):
            params = list(params.named_parameters())
        elif isinstance(params, Tensor):
            params = [params]
        else:
            params = list(params)
        if params and all(isinstance(p, tuple) for p in params):
            if "param_names" in group:
                raise ValueError("give names either as (name, tensor) pairs or as 'param_names', not both")
            group["param_names"] = [n for n, _ in params]
            params = [t for _, t in params]
        elif any(isinstance(p, tuple) for p in params):
            raise ValueError("all params of a group must be (name, tensor) pairs, or none")
        elif "param_names" not in group and self._name_lookup:
            names = [self._name_lookup.get(id(p)) for p in params]
            if all(n is not None for n in names):
                group["param_names"] = names
        group["params"] = params
        for key in ("include_in_weight_decay", "exclude_from_weight_decay"):
            if key in group:
                group[key] = _patterns(key, group[key])
        patterns = group.get("include_in_weight_decay", self.defaults["include_in_weight_decay"]) + group.get(
            "exclude_from_weight_decay", self.defaults["exclude_from_weight_decay"]
        )
        if "param_names" in group and len(group["param_names"]) != len(params):
            raise ValueError("param_names must name every parameter of the group")
        if patterns and "param_names" not in group:
            raise ValueError(
                "include_in_weight_decay / exclude_from_weight_decay match parameter *names*, but this "
                "param group has none: pass a module, model.named_parameters(), or "
                "param_names=dict(model.named_parameters())"
            )
        super().add_param_group(group)

    _zero_state = ("exp_avg", "exp_avg_sq", ("max_exp_avg_sq", "amsgrad"))

    # ------------------------------------------------------------------ clipping
    def _unscaled(self, views: list[ParamView]) -> list[Tensor]:
        """The gradients of ``views`` divided by GradScaler's ``grad_scale`` when it set one
        (``global_clipnorm`` clips before the rule, which unscales the others in the kernel)."""
        grads = [v.grad for v in views]
        grad_scale = K.scaler_of(self)[0]
        if grad_scale is None or not grads:
            return grads
        return torch._foreach_mul(grads, grad_scale.to(grads[0].device, torch.float32).reciprocal())

    @staticmethod
    def _value_clipped(group: dict[str, Any], grads: list[Tensor]) -> list[Tensor]:
        cv = group["clipvalue"]
        if cv is None or not grads:
            return grads
        out = torch._foreach_clamp_max(grads, cv)
        torch._foreach_clamp_min_(out, -cv)
        return out

    def _step_groups(self, groups: list[tuple[dict[str, Any], list[ParamView]]], ctx: StepContext) -> None:
        clip = self.defaults["global_clipnorm"]
        ctx.extra["global_clip"] = None
        views = [v for _, vs in groups for v in vs]
        if clip is not None and views:
            grads = [
                g for group, vs in groups for g in self._value_clipped(group, self._unscaled(vs))
            ]
            norm = ctx.sum_over(F.local_sumsq(grads), views).sqrt()
            # a device tensor (no host read), in float64 where the device has it: the factor
            # the host computation would give; NaN for a non-finite norm (as Keras)
            norm = norm.to(torch.float32 if norm.device.type == "mps" else torch.float64)
            factor = clip / norm.clamp_min(clip)
            ctx.extra["global_clip"] = torch.where(norm.isfinite(), factor, math.nan).float()
        super()._step_groups(groups, ctx)

    # ------------------------------------------------------------------ update
    def _decay_mask(self, group: dict[str, Any], views: list[ParamView]) -> list[bool]:
        if group["weight_decay"] == 0:
            return [False] * len(views)
        names = group.get("param_names")
        include, exclude = group["include_in_weight_decay"], group["exclude_from_weight_decay"]
        if not include and not exclude:
            return [True] * len(views)
        if names is None:  # the group was edited after construction
            raise ValueError("weight-decay patterns need the param group's 'param_names'")
        by_id = {id(p): n for p, n in zip(group["params"], names)}
        return [_use_weight_decay(by_id[id(v.param)], include, exclude) for v in views]

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd, cv, cn = group["weight_decay"], group["clipvalue"], group["clipnorm"]
        global_clip = ctx.extra.get("global_clip")
        scaler: Any = self
        if global_clip is not None:  # value clip, then the optimizer-wide factor, before the rule
            grads = self._value_clipped(group, self._unscaled(views))
            grads = torch._foreach_mul(grads, global_clip.to(grads[0].device))
            views = [dataclasses.replace(v, grad=g) for v, g in zip(views, grads)]
            cv = None
            # the gradients are unscaled already: the rule keeps GradScaler's found_inf only
            scaler = types.SimpleNamespace(found_inf=K.scaler_of(self)[1])
        scalars = [
            {"decay": 1.0 - lr * wd if d else 1.0, "beta1": beta1, "beta2": beta2, "eps": group["eps"],
             "size": -lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t),
             "clipvalue": 0.0 if cv is None else cv, "clipnorm": 0.0 if cn is None else cn}
            for t, d in zip(F.advance_steps(views), self._decay_mask(group, views))
        ]  # fmt: skip
        states = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        K.apply(scaler, adam_weight_decay_rule, views, states, scalars, ctx=ctx,
                sums=CLIPNORM_SUMS if cn is not None else (), decay=wd != 0.0,
                amsgrad=bool(group["amsgrad"]), clipvalue=cv is not None, clipnorm=cn is not None)  # fmt: skip


#: the whole-tensor sum :func:`adam_weight_decay_rule` needs for ``clipnorm``
CLIPNORM_SUMS = ("grad_sq",)


def adam_weight_decay_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    decay: bool,
    amsgrad: bool,
    clipvalue: bool,
    clipnorm: bool,
    phase: str = "update",
) -> Any:
    """One tensor's update (see :class:`AdamWeightDecay`): ``s["decay"]`` is ``1 - lr * wd``
    for a decayed parameter (1 otherwise), ``s["size"]`` the negative step size.  With
    ``clipnorm``, ``phase="sums"`` gives the squares of the (value-clipped) gradient and
    ``s["grad_sq"]`` then holds their sum over the whole tensor."""
    if clipvalue:
        g = torch.clamp(g, min=-s["clipvalue"], max=s["clipvalue"])
    if clipnorm:
        if phase == "sums":
            return {"grad_sq": g * g}
        g = g * (s["clipnorm"] / torch.clamp(s["grad_sq"].sqrt(), min=s["clipnorm"]))
    if decay:
        p = p * s["decay"]
    m = torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"])
    v = K.ema_sq(st["exp_avg_sq"], g, s["beta2"])
    new = {"exp_avg": m, "exp_avg_sq": v}
    if amsgrad:
        v = new["max_exp_avg_sq"] = torch.maximum(st["max_exp_avg_sq"], v)
    return p + (s["size"] * m) / (v.sqrt() + s["eps"]), new
