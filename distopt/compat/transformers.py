"""``transformers.optimization``, computed by distopt: same names, signatures and defaults.

Replace ``from transformers import optimization`` by
``from distopt.compat import transformers as optimization`` (or import the names directly).

* ``AdamW``: the legacy ``transformers.AdamW`` (``eps=1e-6``, ``weight_decay=0.0``,
  ``correct_bias``), computed by :class:`distopt.optim.AdamW` with ``transformers_order=True``
  (its arithmetic: ``eps`` added before the bias correction, decay applied after the update).
  ``no_deprecation_warning`` is accepted; no warning is emitted.
* ``Adafactor``: ``transformers.Adafactor``, computed by :class:`distopt.optim.Adafactor`.
* ``AdamWeightDecay`` and ``create_optimizer``: the TensorFlow-side API in PyTorch form.  A torch
  optimizer needs its parameters, so ``AdamWeightDecay`` takes ``params`` first and
  ``create_optimizer`` takes them as the keyword ``params=`` (the one deviation from the seed's
  signature); ``create_optimizer`` returns ``(AdamWeightDecay, WarmUp scheduler)`` where
  TensorFlow returned ``(optimizer, lr_schedule)``.
* The schedules (``get_scheduler``, ``SchedulerType``, ``get_*_schedule*``, ``AdafactorSchedule``,
  ``WarmUp``, ...) are re-exported from :mod:`distopt.schedules`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch.optim import Optimizer

from distopt import schedules as _schedules
from distopt.compat import forward_init, lazy_classes
from distopt.schedules import TRANSFORMERS_NAMES as _SCHEDULE_NAMES

# --------------------------------------------------------------------------- schedules

# The transformers-named schedules, as listed once in distopt.schedules' registry.
for _name in _SCHEDULE_NAMES:
    globals()[_name] = getattr(_schedules, _name)


# --------------------------------------------------------------------------- optimizers


def _adamw(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
           no_deprecation_warning=False):
    base = type(self)._distopt_base
    base.__init__(self, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                  correct_bias=correct_bias, transformers_order=True)


def _adafactor(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
               beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True,
               warmup_init=False):
    forward_init(self, params, locals())


def _adam_weight_decay(self, params, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                       amsgrad=False, weight_decay_rate=0.0, include_in_weight_decay=None,
                       exclude_from_weight_decay=None, name="AdamWeightDecay", **kwargs):
    _forward_tf(self, params, dict(
        learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad,
        weight_decay_rate=weight_decay_rate, include_in_weight_decay=include_in_weight_decay,
        exclude_from_weight_decay=exclude_from_weight_decay, name=name, **kwargs))


#: TF name -> torch name, for a distopt AdamWeightDecay written with torch's names
_TF_TO_TORCH = {"learning_rate": "lr", "epsilon": "eps", "weight_decay_rate": "weight_decay"}


def _forward_tf(self: Any, params: Any, args: dict[str, Any]) -> None:
    from distopt.optim._factory import _accepted

    base = type(self)._distopt_base
    accepted, var_kw = _accepted(base)
    out: dict[str, Any] = {}
    for key, value in args.items():
        if key in accepted or var_kw:
            out[key] = value
        elif key in ("beta_1", "beta_2") and "betas" in accepted:
            out["betas"] = (args["beta_1"], args["beta_2"])
        elif _TF_TO_TORCH.get(key) in accepted:
            out[_TF_TO_TORCH[key]] = value
        elif key == "name" or value is None or (key == "amsgrad" and not value):
            continue  # a Keras name; options left at their "off" value
        else:
            raise NotImplementedError(
                f"AdamWeightDecay: {key}={value!r} is not supported by "
                f"{base.__module__}.{base.__qualname__}"
            )
    base.__init__(self, params, **out)


_SPECS = {
    "AdamW": ("AdamW", _adamw, "``transformers.AdamW`` (legacy arithmetic, ``correct_bias``), "
              "computed by :class:`distopt.optim.AdamW` with ``transformers_order=True``."),
    "Adafactor": ("Adafactor", _adafactor, "``transformers.Adafactor``, computed by "
                  ":class:`distopt.optim.Adafactor`."),
    "AdamWeightDecay": ("AdamWeightDecay", _adam_weight_decay,
                        "transformers' TensorFlow ``AdamWeightDecay`` in PyTorch form (``params`` "
                        "first), computed by :class:`distopt.optim.AdamWeightDecay`."),
}

_class_getattr = lazy_classes(globals(), _SPECS)


def __getattr__(name: str) -> Any:
    if name in _SPECS:
        return _class_getattr(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_optimizer(
    init_lr: float,
    num_train_steps: int,
    num_warmup_steps: int,
    min_lr_ratio: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_epsilon: float = 1e-8,
    adam_clipnorm: float | None = None,
    adam_global_clipnorm: float | None = None,
    weight_decay_rate: float = 0.0,
    power: float = 1.0,
    include_in_weight_decay: list[str] | None = None,
    *,
    params: Iterable,
) -> tuple[Optimizer, Any]:
    """transformers' TensorFlow ``create_optimizer`` in PyTorch form.

    Returns ``(optimizer, lr_schedule)``: an :class:`AdamWeightDecay` over ``params`` (weight
    decay off for names matching ``LayerNorm``, ``layer_norm`` and ``bias`` unless listed in
    ``include_in_weight_decay``), and a :class:`~distopt.schedules.WarmUp` scheduler: linear
    warmup to ``init_lr`` over ``num_warmup_steps``, then polynomial decay (``power``) to
    ``init_lr * min_lr_ratio`` at ``num_train_steps``.  Call ``lr_schedule.step()`` after each
    ``optimizer.step()``.  ``params`` (keyword only) is the one addition to the seed signature;
    pass ``model.named_parameters()`` for the name-based decay rules to apply.
    """
    schedule_fn = _schedules.create_tf_style_schedule
    cls = __getattr__("AdamWeightDecay")
    kwargs: dict[str, Any] = {}
    if adam_clipnorm is not None:
        kwargs["clipnorm"] = adam_clipnorm
    if adam_global_clipnorm is not None:
        kwargs["global_clipnorm"] = adam_global_clipnorm
    optimizer = cls(
        params,
        learning_rate=init_lr,
        beta_1=adam_beta1,
        beta_2=adam_beta2,
        epsilon=adam_epsilon,
        weight_decay_rate=weight_decay_rate,
        include_in_weight_decay=include_in_weight_decay,
        exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"],
        **kwargs,
    )
    lr_schedule = schedule_fn(optimizer, init_lr, num_train_steps, num_warmup_steps,
                              min_lr_ratio=min_lr_ratio, power=power)
    return optimizer, lr_schedule


# --------------------------------------------------------------------------- TensorFlow side
from distopt.compat._tf_accumulator import GradientAccumulator  # noqa: E402

__all__ = [*_SPECS, "create_optimizer", "GradientAccumulator", *_SCHEDULE_NAMES]
