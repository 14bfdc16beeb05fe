"""``timm.optim``, computed by distopt: same names, signatures and defaults.

Replace ``from timm.optim import X`` by ``from distopt.compat.timm import X``.  What you get:

* timm's own optimizer classes (``AdaBelief``, ``Adafactor``, ``Adahessian``, ``AdamP``,
  ``Lamb``, ``Lars``, ``MADGRAD``, ``NvNovoGrad``, ``RMSpropTF``, ``SGDP``, the legacy
  ``AdamWLegacy`` / ``NAdamLegacy`` (also under its older name ``Nadam``) / ``RAdamLegacy``)
  and the ``torch.optim`` classes ``timm.optim`` re-exports (``SGD``, ``Adam``, ``AdamW``,
  ``NAdam``, ``RAdam``, ``Adamax``, ``RMSprop``, ``Adagrad``, ``Adadelta``), each with the seed's
  constructor signature, as subclasses of the distopt optimizers;
* ``Muon`` (timm 1.0's, with the names ``muon``, ``nmuon``, ``adamuon``, ``nadamuon``): distopt's
  class has timm's signature and defaults, plus the keyword-only ``ns_dtype``;
* ``Kron`` (PSGD, names ``kron``, ``kronw``, ``kronc``): timm's signature and defaults, plus the
  keyword-only ``seed`` of its random stream (always deterministic, as timm's ``deterministic=True``);
* ``AdafactorBigVision`` (names ``adafactorbv``, ``adafactorbvc``, ``cadafactorbv``,
  ``cadafactorbvc``): distopt's class has timm's signature and defaults;
* ``Lookahead``; ``create_optimizer_v2``, ``create_optimizer``, ``optimizer_kwargs``,
  ``list_optimizers``, ``get_optimizer_class``, ``param_groups_weight_decay``,
  ``param_groups_layer_decay``.

Deviations (all loud, none silent): implementation switches (``foreach``, ``fused``) are accepted
and ignored — distopt is always multi-tensor; ``capturable``/``differentiable`` and options the
distopt class does not implement (``caution``, ``corrected_weight_decay``, ...) are accepted at
their defaults and raise ``NotImplementedError`` otherwise.  ``create_optimizer_v2`` with
``layer_decay`` sets each group's ``lr`` (and ``initial_lr``) to ``lr * scale`` and does not
leave ``lr_scale`` in the groups, so timm's schedulers, torch's and distopt's all apply the
scale exactly once (timm leaves ``lr`` unscaled and only timm's schedulers apply it).
Without a ``group_matcher``, layers are found by :func:`distopt.optim._param_groups.layer_ids`
(timm would put every parameter of a non-timm model in one layer).

The ``torch.optim``-named classes compute what the distopt class of the same algorithm computes;
``NAdam`` is timm's legacy formulation (as ``NAdamLegacy``); ``RAdam`` adds ``weight_decay`` to
the gradient unless ``decoupled_weight_decay`` (torch's arithmetic; ``RAdamLegacy`` decouples it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import required

from distopt.compat import forward_init, lazy_classes
from distopt.optim._factory import default_registry, optimizer_kwargs
from distopt.optim._param_groups import param_groups_layer_decay as param_groups_layer_decay
from distopt.optim._param_groups import param_groups_weight_decay as param_groups_weight_decay
from distopt.optim.adafactor_bv import AdafactorBigVision as AdafactorBigVision  # timm signature
from distopt.optim.kron import Kron as Kron  # timm signature and defaults, plus keyword-only seed
from distopt.optim.lookahead import Lookahead as Lookahead
from distopt.optim.muon import Muon as Muon  # timm's signature and defaults already (issue 14)

# --------------------------------------------------------------------------- timm's classes
# Each function below has exactly the seed constructor's parameters and defaults.


def _adabelief(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0, amsgrad=False,
               decoupled_decay=True, fixed_decay=False, rectify=True, degenerated_to_sgd=True,
               foreach=None):
    forward_init(self, params, locals())


def _adafactor(self, params, lr=None, eps=1e-30, eps_scale=1e-3, clip_threshold=1.0, decay_rate=-0.8,
               betas=None, weight_decay=0.0, scale_parameter=True, warmup_init=False,
               min_dim_size_to_factor=16, caution=False):
    forward_init(self, params, locals())


def _adahessian(self, params, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                hessian_power=1.0, update_each=1, n_samples=1, avg_conv_kernel=False):
    forward_init(self, params, locals())


def _adamp(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, delta=0.1,
           wd_ratio=0.1, nesterov=False, caution=False):
    forward_init(self, params, locals())


def _adamw_legacy(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                  amsgrad=False, caution=False, corrected_weight_decay=False, maximize=False,
                  foreach=None, capturable=False, clipping_threshold=None):
    forward_init(self, params, locals())


def _lamb(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
          weight_decay=0.01, grad_averaging=True, max_grad_norm=1.0, trust_clip=False,
          always_adapt=False, caution=False, decoupled_decay=False, corrected_weight_decay=False,
          foreach=None):
    forward_init(self, params, locals())


def _lars(self, params, lr=1.0, momentum=0, dampening=0, weight_decay=0, nesterov=False,
          trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False, foreach=None):
    forward_init(self, params, locals())


def _madgrad(self, params, lr=1e-2, momentum=0.9, weight_decay=0, eps=1e-6, decoupled_decay=False):
    forward_init(self, params, locals())


def _nadam_legacy(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                  schedule_decay=4e-3):
    forward_init(self, params, locals())


def _nvnovograd(self, params, lr=1e-3, betas=(0.95, 0.98), eps=1e-8, weight_decay=0,
                grad_averaging=False, amsgrad=False, decoupled_decay=False,
                corrected_weight_decay=False):
    forward_init(self, params, locals())


def _radam_legacy(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0):
    forward_init(self, params, locals())


def _rmsproptf(self, params, lr=1e-2, alpha=0.9, eps=1e-10, weight_decay=0, momentum=0.0,
               centered=False, decoupled_decay=False, corrected_weight_decay=False,
               lr_in_momentum=True, caution=False, foreach=None):
    forward_init(self, params, locals())


def _sgdp(self, params, lr=required, momentum=0, dampening=0, weight_decay=0, nesterov=False,
          eps=1e-8, delta=0.1, wd_ratio=0.1, caution=False):
    if lr is required:
        raise TypeError("SGDP: lr is required")
    forward_init(self, params, locals())


# --------------------------------------------------------------------------- torch.optim names
# timm.optim re-exports these from torch.optim; the signatures are torch 2.x's.


def _sgd(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
         maximize=False, foreach=None, differentiable=False, fused=None):
    forward_init(self, params, locals())


def _adam(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
          foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
          decoupled_weight_decay=False):
    forward_init(self, params, locals())


def _adamw(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
           maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
    forward_init(self, params, locals())


def _nadam(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
           decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
           differentiable=False):
    forward_init(self, params, locals(), aliases={"momentum_decay": "schedule_decay"})


def _radam(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
           decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
           differentiable=False):
    forward_init(self, params, locals())


def _adamax(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, foreach=None, *,
            maximize=False, differentiable=False, capturable=False):
    forward_init(self, params, locals())


def _rmsprop(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
             centered=False, capturable=False, foreach=None, maximize=False, differentiable=False):
    forward_init(self, params, locals())


def _adagrad(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
             eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None):
    forward_init(self, params, locals())


def _adadelta(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
              capturable=False, maximize=False, differentiable=False):
    forward_init(self, params, locals())


def _doc(seed: str, base: str) -> str:
    return (f"``{seed}`` with its signature and defaults, computed by "
            f":class:`distopt.optim.{base}` (see that class for the update rule and state).")


_SPECS: dict[str, tuple[str, Callable[..., None], str]] = {
    "AdaBelief": ("AdaBelief", _adabelief, _doc("timm.optim.AdaBelief", "AdaBelief")),
    "Adafactor": ("AdafactorTimm", _adafactor, _doc("timm.optim.Adafactor", "AdafactorTimm")),
    "Adahessian": ("Adahessian", _adahessian, _doc("timm.optim.Adahessian", "Adahessian")),
    "AdamP": ("AdamP", _adamp, _doc("timm.optim.AdamP", "AdamP")),
    "AdamWLegacy": ("AdamW", _adamw_legacy, _doc("timm.optim.AdamWLegacy", "AdamW")),
    "Lamb": ("Lamb", _lamb, _doc("timm.optim.Lamb", "Lamb")),
    "Lars": ("Lars", _lars, _doc("timm.optim.Lars", "Lars")),
    "MADGRAD": ("MADGRAD", _madgrad, _doc("timm.optim.MADGRAD", "MADGRAD")),
    "NAdamLegacy": ("Nadam", _nadam_legacy, _doc("timm.optim.NAdamLegacy", "Nadam")),
    "Nadam": ("Nadam", _nadam_legacy, _doc("timm.optim.Nadam (timm < 1.0; NAdamLegacy now)", "Nadam")),
    "NvNovoGrad": ("NvNovoGrad", _nvnovograd, _doc("timm.optim.NvNovoGrad", "NvNovoGrad")),
    "RAdamLegacy": ("RAdam", _radam_legacy, _doc("timm.optim.RAdamLegacy", "RAdam")),
    "RMSpropTF": ("RMSpropTF", _rmsproptf, _doc("timm.optim.RMSpropTF", "RMSpropTF")),
    "SGDP": ("SGDP", _sgdp, _doc("timm.optim.SGDP", "SGDP")),
    "SGD": ("SGD", _sgd, _doc("torch.optim.SGD (timm.optim.SGD)", "SGD")),
    "Adam": ("Adam", _adam, _doc("torch.optim.Adam (timm.optim.Adam)", "Adam")),
    "AdamW": ("AdamW", _adamw, _doc("torch.optim.AdamW (timm.optim.AdamW)", "AdamW")),
    "NAdam": ("Nadam", _nadam, _doc("torch.optim.NAdam (timm.optim.NAdam)", "Nadam")),
    "RAdam": ("RAdam", _radam, _doc("torch.optim.RAdam (timm.optim.RAdam)", "RAdam")),
    "Adamax": ("Adamax", _adamax, _doc("torch.optim.Adamax (timm.optim.Adamax)", "Adamax")),
    "RMSprop": ("RMSprop", _rmsprop, _doc("torch.optim.RMSprop (timm.optim.RMSprop)", "RMSprop")),
    "Adagrad": ("Adagrad", _adagrad, _doc("torch.optim.Adagrad (timm.optim.Adagrad)", "Adagrad")),
    "Adadelta": ("Adadelta", _adadelta, _doc("torch.optim.Adadelta (timm.optim.Adadelta)", "Adadelta")),
}

__getattr__ = lazy_classes(globals(), _SPECS)


# --------------------------------------------------------------------------- the factory

#: timm's registry names -> the facade classes above (so kwargs use timm's / torch's names)
_FACADE_OF = {
    "SGD": "SGD", "SGDP": "SGDP", "Adam": "Adam", "AdamW": "AdamW", "Nadam": "NAdam",
    "RAdam": "RAdam", "Adamax": "Adamax", "AdamP": "AdamP", "AdaBelief": "AdaBelief",
    "AdafactorTimm": "Adafactor", "Adahessian": "Adahessian", "Lamb": "Lamb", "Lars": "Lars",
    "MADGRAD": "MADGRAD", "NvNovoGrad": "NvNovoGrad", "RMSprop": "RMSprop",
    "RMSpropTF": "RMSpropTF", "Adagrad": "Adagrad", "Adadelta": "Adadelta",
}


def _build_registry():
    reg = default_registry.copy()
    for name, spec in list(reg._specs.items()):
        target = _FACADE_OF.get(spec.cls) if isinstance(spec.cls, str) else None
        if target is not None:
            reg._specs[name] = type(spec)(name, f"{__name__}.{target}", spec.defaults,
                                          spec.description, spec.has_momentum)
    for name, cls, desc in (("adamwlegacy", "AdamWLegacy", "timm's AdamW predating torch's"),
                            ("nadamlegacy", "NAdamLegacy", "timm's NAdam predating torch's"),
                            ("radamlegacy", "RAdamLegacy", "timm's RAdam predating torch's")):
        reg._specs.pop(name, None)  # the core registry's entry: replaced by the facade class
        reg.register(name, f"{__name__}.{cls}", None, desc, has_momentum=False)
    for name in ("adamc", "cadamw", "cadamc"):  # timm: AdamWLegacy (caution, corrected decay)
        spec = reg._specs[name]
        reg._specs[name] = type(spec)(name, f"{__name__}.AdamWLegacy", spec.defaults,
                                      spec.description, spec.has_momentum)
    return reg


_registry = _build_registry()


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
    """timm's ``create_optimizer_v2`` (see :func:`distopt.optim.create_optimizer_v2`).

    Builds the facade classes of this module; with ``layer_decay`` the groups' lrs are scaled
    and no ``lr_scale`` key is left (see the module docstring).
    """
    return _registry.create(
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
        keep_lr_scale=False,
        **kwargs,
    )


def create_optimizer(args: Any, model: nn.Module | Iterable, filter_bias_and_bn: bool = True) -> Optimizer:
    """timm's legacy factory: ``create_optimizer_v2(model, **optimizer_kwargs(args), ...)``."""
    return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), filter_bias_and_bn=filter_bias_and_bn)


def list_optimizers(
    filter: str | Iterable[str] = "",
    exclude_filters: Iterable[str] | None = None,
    with_description: bool = False,
) -> list:
    """Optimizer names this facade's ``create_optimizer_v2`` accepts (timm's names)."""
    return _registry.list(filter, exclude_filters, with_description)


def get_optimizer_class(name: str, bind_defaults: bool = True) -> Any:
    """The facade class for ``name`` (a ``functools.partial`` with the name's defaults bound)."""
    return _registry.get_class(name, bind_defaults)


__all__ = sorted([
    *_SPECS,  # the classes, built on first access
    "Lookahead",
    "create_optimizer",
    "create_optimizer_v2",
    "get_optimizer_class",
    "list_optimizers",
    "optimizer_kwargs",
    "param_groups_layer_decay",
    "param_groups_weight_decay",
])
