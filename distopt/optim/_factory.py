"""Create optimizers by name, timm style: ``create_optimizer_v2(model, "adamw", lr=1e-3)``.

The registry maps each name to a distopt class (imported lazily, by name, from
:mod:`distopt.optim`) plus the per-name default keyword arguments timm uses (``sgd`` is Nesterov
SGD, ``lambc`` clips the trust ratio, ``rmsprop`` uses ``alpha=0.9``, ...).  A ``lookahead_``
prefix wraps the optimizer in :class:`~distopt.optim.Lookahead`.  Users add names with
:func:`register_optimizer` (also a decorator).

Differences from timm, on purpose:

* Layer-wise lr decay is applied to each group's ``lr`` (and ``initial_lr``) when the optimizer
  is built, and ``lr_scale`` is kept in the group: any scheduler that scales ``initial_lr``
  (torch's, distopt's) keeps the per-layer scale.  timm instead leaves ``lr`` unscaled and relies
  on timm's own schedulers multiplying by ``lr_scale`` — so do not combine *this* factory with
  ``timm.scheduler``; :mod:`distopt.compat.timm` builds the same groups without the ``lr_scale``
  key for that case.
* Keyword arguments the chosen class does not take raise ``TypeError`` naming them (timm lets the
  class fail); ``eps`` and ``betas`` are still dropped silently for classes without them, and
  ``momentum`` is only passed to optimizers with a momentum argument, as timm does.
* ``foreach``: distopt optimizers are always multi-tensor.  ``foreach`` is passed to classes that
  take it (e.g. a registered ``torch.optim`` class) and otherwise ignored (debug log).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import logging
import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from distopt.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

__all__ = [
    "OptimizerRegistry",
    "OptimSpec",
    "create_optimizer",
    "create_optimizer_v2",
    "default_registry",
    "get_optimizer_class",
    "list_optimizers",
    "optimizer_kwargs",
    "register_optimizer",
]

_logger = logging.getLogger(__name__)

LOOKAHEAD_PREFIX = "lookahead_"


@dataclass(frozen=True)
class OptimSpec:
    """One registry entry.

    ``cls`` is a class, or a string naming one: ``"AdamW"`` (an attribute of
    :mod:`distopt.optim`) or ``"package.module.Class"``; strings are resolved at first use so
    entries can name classes that are imported lazily.  ``has_momentum``: whether the factory's
    ``momentum`` argument is passed (None: when the class takes a ``momentum`` argument).
    """

    name: str
    cls: type | str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    has_momentum: bool | None = None

    def resolve(self) -> type:
        if not isinstance(self.cls, str):
            return self.cls
        if "." in self.cls:
            module, attr = self.cls.rsplit(".", 1)
            return getattr(importlib.import_module(module), attr)
        import distopt.optim as pkg

        try:
            return getattr(pkg, self.cls)
        except AttributeError:
            raise ImportError(
                f"optimizer {self.name!r}: distopt.optim.{self.cls} is not available in this "
                "installation"
            ) from None

    def available(self) -> bool:
        try:
            self.resolve()
        except (ImportError, AttributeError):
            return False
        return True


def _accepted(cls: Callable) -> tuple[set[str], bool]:
    """Keyword names ``cls(params, ...)`` takes, and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return set(), True
    names = {
        n for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    names.discard("params")
    names.discard("self")
    return names, var_kw


class OptimizerRegistry:
    """Names -> :class:`OptimSpec`, and the factory that builds optimizers from them."""

    def __init__(self) -> None:
        self._specs: dict[str, OptimSpec] = {}

    def copy(self) -> OptimizerRegistry:
        new = OptimizerRegistry()
        new._specs = dict(self._specs)
        return new

    # ------------------------------------------------------------------ registration
    def register(
        self,
        name: str,
        cls: type | str,
        defaults: dict[str, Any] | None = None,
        description: str = "",
        has_momentum: bool | None = None,
    ) -> None:
        key = name.lower()
        if key.startswith(LOOKAHEAD_PREFIX):
            raise ValueError(f"optimizer names may not start with {LOOKAHEAD_PREFIX!r}: {name!r}")
        if key in self._specs:
            _logger.warning("optimizer %r already registered, overwriting", key)
        self._specs[key] = OptimSpec(key, cls, dict(defaults or {}), description, has_momentum)

    def alias(self, alias: str, target: str) -> None:
        spec = self.spec(target)
        self._specs[alias.lower()] = replace(spec, name=alias.lower())

    def spec(self, name: str) -> OptimSpec:
        key = name.lower()
        if key not in self._specs:
            valid = ", ".join(self.list())
            raise ValueError(
                f"unknown optimizer {name!r}; valid names (each also with a 'lookahead_' prefix): "
                f"{valid}"
            )
        return self._specs[key]

    def list(
        self,
        filter: str | Iterable[str] = "",
        exclude_filters: Iterable[str] | None = (),
        with_description: bool = False,
    ) -> list:
        names = sorted(n for n, s in self._specs.items() if s.available())
        if filter:
            pats = [filter] if isinstance(filter, str) else list(filter)
            names = sorted({n for n in names for p in pats if fnmatch.fnmatch(n, p)})
        for pat in exclude_filters or ():
            names = [n for n in names if not fnmatch.fnmatch(n, pat)]
        if with_description:
            return [(n, self._specs[n].description) for n in names]
        return names

    def get_class(self, name: str, bind_defaults: bool = True) -> Callable[..., Optimizer]:
        spec = self.spec(name)
        cls = spec.resolve()
        if bind_defaults and spec.defaults:
            return functools.partial(cls, **spec.defaults)
        return cls

    # ------------------------------------------------------------------ the factory
    def create(
        self,
        model_or_params: nn.Module | Iterable,
        opt: str = "sgd",
        lr: float | None = None,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        foreach: bool | None = None,
        filter_bias_and_bn: bool = True,
        fallback_list: Collection[str] = (),
        fallback_no_weight_decay: bool = False,
        layer_decay: float | None = None,
        layer_decay_min_scale: float = 0.0,
        layer_decay_no_opt_scale: float | None = None,
        param_group_fn: Callable[[nn.Module], Iterable] | None = None,
        keep_lr_scale: bool = True,
        **kwargs: Any,
    ) -> Optimizer:
        name = opt.lower()
        lookahead = name.startswith(LOOKAHEAD_PREFIX)
        if lookahead:
            name = name[len(LOOKAHEAD_PREFIX):]
        spec = self.spec(name)
        cls = spec.resolve()
        la_kwargs = {}
        for key in ("lookahead_alpha", "lookahead_k"):
            if key in kwargs:
                if not lookahead:
                    raise TypeError(f"{key} is only accepted with a 'lookahead_' optimizer name")
                la_kwargs[key.split("_", 1)[1]] = kwargs.pop(key)

        if isinstance(model_or_params, nn.Module):
            model = model_or_params
            no_wd = getattr(model, "no_weight_decay", None)
            no_wd_list = set(no_wd()) if callable(no_wd) else set()
            if param_group_fn is not None:
                params: Any = param_group_fn(model)
            elif layer_decay is not None:
                params = param_groups_layer_decay(
                    model,
                    weight_decay=weight_decay,
                    no_weight_decay_list=no_wd_list,
                    fallback_list=fallback_list,
                    fallback_no_weight_decay=fallback_no_weight_decay,
                    weight_decay_exclude_1d=filter_bias_and_bn,
                    layer_decay=layer_decay,
                    min_scale=layer_decay_min_scale,
                    no_opt_scale=layer_decay_no_opt_scale,
                )
                weight_decay = 0.0
            else:
                params = param_groups_weight_decay(
                    model,
                    weight_decay=weight_decay,
                    weight_decay_exclude_1d=filter_bias_and_bn,
                    no_weight_decay_list=no_wd_list,
                    fallback_list=fallback_list,
                    fallback_no_weight_decay=fallback_no_weight_decay,
                )
                weight_decay = 0.0
        else:
            params = model_or_params
        params = list(params)

        accepted, var_kw = _accepted(cls)
        args: dict[str, Any] = {"weight_decay": weight_decay, **kwargs}
        if lr is not None:
            args["lr"] = lr
        for key, value in spec.defaults.items():
            args.setdefault(key, value)
        takes_momentum = spec.has_momentum if spec.has_momentum is not None else "momentum" in accepted
        if takes_momentum:
            args.setdefault("momentum", momentum)
        if not var_kw:
            for key in ("eps", "betas"):  # timm drops these for classes without them
                if key in args and key not in accepted:
                    _logger.debug("%s: dropping %s (not an argument of %s)", name, key, cls.__name__)
                    args.pop(key)
        if foreach is not None:
            if var_kw or "foreach" in accepted:
                args.setdefault("foreach", foreach)
            else:
                _logger.debug("%s: foreach=%s ignored (distopt optimizers are always multi-tensor)",
                              name, foreach)
        if not var_kw:
            unknown = sorted(k for k in args if k not in accepted)
            if unknown:
                raise TypeError(
                    f"optimizer {name!r} ({cls.__module__}.{cls.__qualname__}) does not accept "
                    f"keyword argument(s): {', '.join(unknown)}; it accepts: "
                    f"{', '.join(sorted(accepted))}"
                )

        explicit_lr = [isinstance(g, dict) and "lr" in g for g in params]
        optimizer = cls(params, **args)
        _apply_lr_scales(optimizer, explicit_lr, keep_lr_scale)
        if lookahead:
            from distopt.optim.lookahead import Lookahead

            optimizer = Lookahead(optimizer, **la_kwargs)
        return optimizer


def _apply_lr_scales(optimizer: Optimizer, explicit_lr: list[bool], keep: bool) -> None:
    """Give each group with ``lr_scale`` (and no lr of its own) the lr ``base * lr_scale``."""
    for i, group in enumerate(optimizer.param_groups):
        if "lr_scale" not in group:
            continue
        scale = group["lr_scale"] if keep else group.pop("lr_scale")
        if i < len(explicit_lr) and explicit_lr[i]:
            continue
        lr = group.get("lr")
        if lr is None:
            _logger.warning("param group %d: lr_scale=%g ignored (the optimizer has lr=None)", i, scale)
            continue
        if isinstance(lr, torch.Tensor):
            lr = lr * scale
            group["lr"] = lr
            group["initial_lr"] = lr.clone()
        else:
            lr = float(lr) * float(scale)
            if not math.isfinite(lr):
                raise ValueError(f"param group {i}: lr * lr_scale is not finite")
            group["lr"] = lr
            group["initial_lr"] = lr


# --------------------------------------------------------------------------- the default names

#: (name, distopt class, defaults, has_momentum, description): timm's names and per-name defaults
_BUILTINS: tuple[tuple[str, str, dict[str, Any], bool | None, str], ...] = (
    ("sgd", "SGD", {"nesterov": True}, True, "SGD with Nesterov momentum"),
    ("momentum", "SGD", {"nesterov": False}, True, "SGD with classical (heavy-ball) momentum"),
    ("sgdp", "SGDP", {"nesterov": True}, True, "SGD with projection off the weight direction (Heo et al.)"),
    ("adam", "Adam", {}, False, "Adam (Kingma & Ba)"),
    ("adamw", "AdamW", {}, False, "Adam with decoupled weight decay (Loshchilov & Hutter)"),
    ("nadam", "Nadam", {}, False, "Adam with Nesterov momentum (Dozat)"),
    ("radam", "RAdam", {}, False, "Rectified Adam (Liu et al.)"),
    ("adamax", "Adamax", {}, False, "Adam with an infinity-norm second moment"),
    ("adamp", "AdamP", {"wd_ratio": 0.01, "nesterov": True}, False,
     "Adam with projection off the weight direction (Heo et al.)"),
    ("adabelief", "AdaBelief", {"rectify": False}, False,
     "Adam whose second moment tracks the gradient's deviation from its mean (Zhuang et al.)"),
    ("radabelief", "AdaBelief", {"rectify": True}, False, "AdaBelief with RAdam's rectification"),
    ("adafactor", "AdafactorTimm", {}, False,
     "factored second moments, sublinear memory (Shazeer & Stern); timm flavour"),
    ("adahessian", "Adahessian", {}, False,
     "second order: Hutchinson Hessian-diagonal estimates (Yao et al.); needs create_graph"),
    ("lamb", "Lamb", {}, False, "layer-wise adaptive moments for large batches (You et al.)"),
    ("lambc", "Lamb", {"trust_clip": True}, False, "LAMB with the trust ratio clipped at 1"),
    ("lambw", "Lamb", {"decoupled_decay": True}, False, "LAMB with decoupled weight decay"),
    ("lambcw", "Lamb", {"trust_clip": True, "decoupled_decay": True}, False,
     "LAMB with trust-ratio clipping and decoupled weight decay"),
    ("lars", "Lars", {}, True, "layer-wise adaptive rate scaling (You et al.)"),
    ("larc", "Lars", {"trust_clip": True}, True, "LARS with the trust ratio clipped at 1"),
    ("nlars", "Lars", {"nesterov": True}, True, "LARS with Nesterov momentum"),
    ("nlarc", "Lars", {"nesterov": True, "trust_clip": True}, True,
     "LARS with Nesterov momentum and trust-ratio clipping"),
    ("madgrad", "MADGRAD", {}, True, "momentumized dual-averaged adaptive gradient (Defazio & Jelassi)"),
    ("madgradw", "MADGRAD", {"decoupled_decay": True}, True, "MADGRAD with decoupled weight decay"),
    ("novograd", "NvNovoGrad", {}, False, "NovoGrad: layer-wise normalised second moments (Ginsburg et al.)"),
    ("nvnovograd", "NvNovoGrad", {}, False, "NovoGrad (NVIDIA's formulation; same as 'novograd')"),
    ("novogradw", "NvNovoGrad", {"decoupled_decay": True}, False, "NovoGrad with decoupled weight decay"),
    ("rmsprop", "RMSprop", {"alpha": 0.9}, True, "RMSprop (PyTorch formulation)"),
    ("rmsproptf", "RMSpropTF", {"alpha": 0.9}, True, "RMSprop as TensorFlow computes it"),
    ("rmsproptfw", "RMSpropTF", {"alpha": 0.9, "decoupled_decay": True}, True,
     "TensorFlow-style RMSprop with decoupled weight decay"),
    ("adagrad", "Adagrad", {"eps": 1e-8}, False, "Adagrad (Duchi et al.)"),
    ("adadelta", "Adadelta", {}, False, "Adadelta (Zeiler)"),
    ("adamweightdecay", "AdamWeightDecay", {}, False,
     "Adam with decoupled weight decay as transformers' TensorFlow AdamWeightDecay computes it"),
    # -- timm 1.0 (issue 14)
    ("muon", "Muon", {}, True, "MomentUm Orthogonalized by Newton-Schulz, AdamW fallback for 1-D params (Jordan)"),
    ("nmuon", "Muon", {"nesterov": True}, True, "Muon with Nesterov momentum and a NAdamW fallback"),
    ("adamuon", "Muon", {"algo": "adamuon"}, True,
     "AdaMuon: second moments of the orthogonalised directions (Si et al.)"),
    ("nadamuon", "Muon", {"algo": "adamuon", "nesterov": True}, True,
     "AdaMuon with Nesterov momentum and a NAdamW fallback"),
    ("lion", "Lion", {}, False, "evolved sign momentum (Chen et al.)"),
    ("clion", "Lion", {"caution": True}, False, "Lion with the cautious mask"),
    ("nadamw", "NAdamW", {}, False, "Adam with Nesterov momentum and decoupled weight decay"),
    ("cnadamw", "NAdamW", {"caution": True}, False, "NAdamW with the cautious mask"),
    ("nadamc", "NAdamW", {"corrected_weight_decay": True}, False, "NAdamW with corrected weight decay"),
    ("adopt", "Adopt", {}, False, "Adam that converges with any beta2 (Taniguchi et al.)"),
    ("adoptw", "Adopt", {"decoupled": True}, False, "ADOPT with decoupled weight decay"),
    ("cadopt", "Adopt", {"caution": True}, False, "ADOPT with the cautious mask"),
    ("cadoptw", "Adopt", {"decoupled": True, "caution": True}, False,
     "ADOPT with decoupled weight decay and the cautious mask"),
    ("laprop", "LaProp", {}, False, "momentum of the normalised gradient (Ziyin et al.)"),
    ("claprop", "LaProp", {"caution": True}, False, "LaProp with the cautious mask"),
    ("sgdw", "SGDW", {"nesterov": True}, True, "SGD with decoupled weight decay, Nesterov momentum"),
    ("csgdw", "SGDW", {"nesterov": True, "caution": True}, True, "SGDW with the cautious mask"),
    ("adan", "Adan", {"no_prox": False}, False, "adaptive Nesterov momentum (Xie et al.)"),
    ("adanw", "Adan", {"no_prox": True}, False, "Adan with decoupled weight decay"),
    ("cadan", "Adan", {"caution": True}, False, "Adan with the cautious mask"),
    ("mars", "Mars", {}, False, "variance-reduced preconditioned gradients (Yuan et al.)"),
    ("cmars", "Mars", {"caution": True}, False, "MARS with the cautious mask"),
    ("kron", "Kron", {}, True, "PSGD with Kronecker-factored preconditioners (Li)"),
    ("kronw", "Kron", {"decoupled_decay": True}, True, "PSGD Kron with decoupled weight decay"),
    ("kronc", "Kron", {"decoupled_decay": True, "corrected_weight_decay": True}, True,
     "PSGD Kron with corrected decoupled weight decay (lr^2 / max_lr)"),
    # timm's corrected-decay ("...c") and further cautious names: options of existing classes
    ("lionc", "Lion", {"corrected_weight_decay": True}, False, "Lion with corrected weight decay"),
    ("clionc", "Lion", {"caution": True, "corrected_weight_decay": True}, False,
     "cautious Lion with corrected weight decay"),
    ("cnadamc", "NAdamW", {"caution": True, "corrected_weight_decay": True}, False,
     "cautious NAdamW with corrected weight decay"),
    ("adoptc", "Adopt", {"decoupled": True, "corrected_weight_decay": True}, False,
     "ADOPT with corrected decoupled weight decay"),
    ("cadoptc", "Adopt", {"decoupled": True, "caution": True, "corrected_weight_decay": True}, False,
     "cautious ADOPT with corrected decoupled weight decay"),
    ("lapropc", "LaProp", {"corrected_weight_decay": True}, False, "LaProp with corrected weight decay"),
    ("sgdc", "SGDW", {"nesterov": True, "corrected_weight_decay": True}, True,
     "SGDW with corrected weight decay"),
    ("csgdc", "SGDW", {"nesterov": True, "caution": True, "corrected_weight_decay": True}, True,
     "cautious SGDW with corrected weight decay"),
    ("cadanw", "Adan", {"caution": True, "no_prox": True}, False, "cautious Adan, decoupled decay"),
    ("cadamp", "AdamP", {"wd_ratio": 0.01, "nesterov": True, "caution": True}, False, "cautious AdamP"),
    ("csgdp", "SGDP", {"nesterov": True, "caution": True}, True, "cautious SGDP"),
    ("crmsproptf", "RMSpropTF", {"alpha": 0.9, "caution": True}, True, "cautious RMSpropTF"),
    ("rmsproptfc", "RMSpropTF", {"alpha": 0.9, "decoupled_decay": True, "corrected_weight_decay": True}, True,
     "RMSpropTF with corrected decoupled weight decay"),
    ("novogradc", "NvNovoGrad", {"decoupled_decay": True, "corrected_weight_decay": True}, False,
     "NovoGrad with corrected decoupled weight decay"),
    ("cadafactor", "AdafactorTimm", {"caution": True, "betas": (0.9, 0.999)}, False,
     "cautious Adafactor with first moments (timm flavour)"),
    ("adamwlegacy", "AdamW", {}, False, "timm's AdamW predating torch's (same arithmetic)"),
    ("nadamlegacy", "Nadam", {}, False, "timm's NAdam predating torch's (Dozat's schedule)"),
    ("radamlegacy", "RAdam", {}, False, "timm's RAdam predating torch's"),
    # -- schedule-free (Defazio et al.; not in timm 1.0.31): optimizer.train() / .eval()
    ("adamw_schedulefree", "AdamWScheduleFree", {}, False,
     "schedule-free AdamW: no lr schedule, averaged weights x for eval (Defazio et al.)"),
    ("sgd_schedulefree", "SGDScheduleFree", {}, True, "schedule-free SGD (Defazio et al.)"),
    ("radam_schedulefree", "RAdamScheduleFree", {}, False,
     "schedule-free RAdam: no warmup, no schedule (Defazio et al.)"),
    ("adafactorbv", "AdafactorBigVision", {}, True,
     "Big Vision's Adafactor: factored second moments over the two largest dims, momentum"),
    ("adafactorbvc", "AdafactorBigVision", {"corrected_weight_decay": True}, True,
     "Big Vision Adafactor with corrected weight decay"),
    ("cadafactorbv", "AdafactorBigVision", {"caution": True}, True, "cautious Big Vision Adafactor"),
    ("cadafactorbvc", "AdafactorBigVision", {"caution": True, "corrected_weight_decay": True}, True,
     "cautious Big Vision Adafactor with corrected weight decay"),
    ("adamc", "AdamW", {"corrected_weight_decay": True}, False, "AdamW with corrected weight decay"),
    ("cadamw", "AdamW", {"caution": True}, False, "AdamW with the cautious mask"),
    ("cadamc", "AdamW", {"caution": True, "corrected_weight_decay": True}, False,
     "cautious AdamW with corrected weight decay"),
    ("clamb", "Lamb", {"caution": True}, False, "LAMB with the cautious mask"),
    ("clambw", "Lamb", {"caution": True, "decoupled_decay": True}, False,
     "cautious LAMB with decoupled weight decay"),
    ("lambcd", "Lamb", {"decoupled_decay": True, "corrected_weight_decay": True}, False,
     "LAMB with corrected decoupled weight decay"),
    ("radamw", "RAdam", {"decoupled_weight_decay": True}, False,
     "Rectified Adam with decoupled weight decay (torch's RAdam, decoupled_weight_decay=True)"),
)

default_registry = OptimizerRegistry()
for _name, _cls, _defaults, _mom, _desc in _BUILTINS:
    default_registry.register(_name, _cls, _defaults, _desc, has_momentum=_mom)
default_registry.alias("nesterov", "sgd")


# --------------------------------------------------------------------------- public API


def register_optimizer(
    name: str,
    cls: type | str | None = None,
    defaults: dict[str, Any] | None = None,
    description: str = "",
    *,
    has_momentum: bool | None = None,
) -> Any:
    """Register ``cls`` (a class, or a dotted path imported at first use) under ``name``.

    ``defaults`` are keyword arguments applied unless the caller passes them.  Without ``cls``
    it returns a class decorator::

        @register_optimizer("mysgd", defaults={"nesterov": True})
        class MySGD(torch.optim.Optimizer): ...

    The name is then usable in :func:`create_optimizer_v2` (also with a ``lookahead_``
    prefix), :func:`get_optimizer_class` and :func:`list_optimizers`.
    """
    if cls is None:
        def decorator(c: type) -> type:
            default_registry.register(name, c, defaults, description, has_momentum)
            return c

        return decorator
    default_registry.register(name, cls, defaults, description, has_momentum)
    return cls


def list_optimizers(
    filter: str | Iterable[str] = "",
    exclude_filters: Iterable[str] | None = (),
    with_description: bool = False,
) -> list:
    """Registered optimizer names available in this installation (sorted).

    ``filter`` / ``exclude_filters`` are ``fnmatch`` patterns (``"adam*"``); with
    ``with_description`` the result is a list of ``(name, description)``.
    """
    return default_registry.list(filter, exclude_filters, with_description)


def get_optimizer_class(name: str, bind_defaults: bool = True) -> Callable[..., Optimizer]:
    """The class registered under ``name`` (a ``functools.partial`` with its defaults bound).

    Raises ValueError (listing the valid names) for an unknown name.
    """
    return default_registry.get_class(name, bind_defaults)


def create_optimizer_v2(
    model_or_params: nn.Module | Iterable,
    opt: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    foreach: bool | None = None,
    filter_bias_and_bn: bool = True,
    fallback_list: Collection[str] = (),
    fallback_no_weight_decay: bool = False,
    layer_decay: float | None = None,
    layer_decay_min_scale: float = 0.0,
    layer_decay_no_opt_scale: float | None = None,
    param_group_fn: Callable[[nn.Module], Iterable] | None = None,
    **kwargs: Any,
) -> Optimizer:
    """Build an optimizer by name (timm's ``create_optimizer_v2``, same arguments).

    Args:
        model_or_params: a model (param groups are built from it) or params / param groups
            (passed through unchanged).
        opt: registered name, optionally prefixed ``lookahead_`` (see :func:`list_optimizers`).
        lr: learning rate; None keeps the class default.
        weight_decay: weight decay.  With a model, biases, 1-D parameters (norms) and the names
            ``model.no_weight_decay()`` returns get none when ``filter_bias_and_bn``.
        momentum: passed to optimizers with momentum (default 0.9, as in timm).
        foreach: accepted for timm compatibility (see the module docstring).
        filter_bias_and_bn: exclude biases/1-D parameters from weight decay.
        fallback_list, fallback_no_weight_decay: timm's hybrid-optimizer grouping; the groups
            get ``use_fallback=True``, which distopt optimizers ignore.
        layer_decay: layer-wise lr decay factor; group ``i`` gets
            ``lr = base_lr * layer_decay ** (L - 1 - i)`` (layers from
            :func:`distopt.optim._param_groups.layer_ids`), stored also as ``lr_scale`` and
            ``initial_lr`` so schedulers keep the scale.
        layer_decay_min_scale: lower bound of the scale.
        layer_decay_no_opt_scale: parameters whose scale is below this are frozen.
        param_group_fn: ``fn(model) -> param groups``; overrides the grouping above.
        **kwargs: optimizer arguments (``betas``, ``eps``, ...; ``lookahead_alpha`` and
            ``lookahead_k`` with a ``lookahead_`` name).  Unknown ones raise TypeError.
    """
    return default_registry.create(
        model_or_params,
        opt=opt,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        foreach=foreach,
        filter_bias_and_bn=filter_bias_and_bn,
        fallback_list=fallback_list,
        fallback_no_weight_decay=fallback_no_weight_decay,
        layer_decay=layer_decay,
        layer_decay_min_scale=layer_decay_min_scale,
        layer_decay_no_opt_scale=layer_decay_no_opt_scale,
        param_group_fn=param_group_fn,
        **kwargs,
    )


def optimizer_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments for :func:`create_optimizer_v2` from an argparse-style config.

    Reads ``opt``, ``lr``, ``weight_decay``, ``momentum`` and, when present and not None,
    ``opt_eps``, ``opt_betas``, ``layer_decay``, ``layer_decay_min_scale``,
    ``layer_decay_no_opt_scale``, ``opt_args`` (a dict merged in) and ``opt_foreach``.
    """
    kwargs: dict[str, Any] = {
        "opt": cfg.opt,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "momentum": cfg.momentum,
    }
    optional = (
        ("opt_eps", "eps"),
        ("opt_betas", "betas"),
        ("layer_decay", "layer_decay"),
        ("layer_decay_min_scale", "layer_decay_min_scale"),
        ("layer_decay_no_opt_scale", "layer_decay_no_opt_scale"),
    )
    for attr, key in optional:
        value = getattr(cfg, attr, None)
        if value is not None:
            kwargs[key] = value
    opt_args = getattr(cfg, "opt_args", None)
    if opt_args is not None:
        kwargs.update(opt_args)
    foreach = getattr(cfg, "opt_foreach", None)
    if foreach is not None:
        kwargs["foreach"] = foreach
    return kwargs


def create_optimizer(args: Any, model: nn.Module | Iterable, filter_bias_and_bn: bool = True) -> Optimizer:
    """Legacy factory: ``create_optimizer_v2(model, **optimizer_kwargs(args), ...)``."""
    return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), filter_bias_and_bn=filter_bias_and_bn)
