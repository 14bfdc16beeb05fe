"""Hyperparameters declared once: the spec a distopt optimizer's constructor is built from.

Each optimizer lists its hyperparameters in one class attribute, ``hypers``: a
:class:`HyperSpec` of :class:`Hyper` entries, each with its name, default, validator and type
annotation, in the order of the constructor's parameters (after ``params``); :data:`KW_ONLY`
marks where the keyword-only ones start.  From that one list :class:`DistOptimizer` builds

* the constructor: ``__init__(self, params, <hyperparameters>)``, with exactly the declared
  names, order, defaults, keyword-only markers and annotations (``inspect.signature`` shows
  them; unknown or missing arguments raise ``TypeError`` naming the class);
* the validation: each value goes through its entry's validator, which raises ``ValueError``
  saying what was wrong and what is allowed, and returns the value to store (e.g. ``betas`` as
  a tuple);
* the ``defaults`` dict of the param groups: the validated values under their names.

Usage (a new optimizer in ``distopt/optim/myopt.py``)::

    from distopt.optim._core import DistOptimizer
    from distopt.optim._hyper import KW_ONLY, HyperSpec, betas, flag, lr, nonneg


    class MyOpt(DistOptimizer):
        '''Update rule and defaults in the docstring, as for every optimizer.'''

        hypers = HyperSpec(
            lr(1e-3),
            betas((0.9, 0.999)),
            nonneg("eps", 1e-8),
            nonneg("weight_decay", 0.0),
            nonneg("momentum", 0.9, below=1.0),  # [0, 1)
            KW_ONLY,
            flag("maximize", False),
        )

        def _configure(self, params, hypers):  # optional: cross-option checks, derived entries
            if hypers["maximize"] and hypers["momentum"] == 0.0:
                raise ValueError("...")
            return params, hypers

        def _init_state(self, group, view): ...
        def _update(self, group, views, ctx): ...

``MyOpt(params, lr=1e-2)`` then validates, builds ``defaults`` and calls ``Optimizer.__init__``.
A class that needs its own constructor (a wrapper, a facade) does not declare ``hypers``.
Entries for other kinds of values: :func:`integer`, :func:`option` (any value, an optional
validator); :func:`adam_hypers` gives the four leading entries of the Adam family; a required hyperparameter has no default (``lr(REQUIRED)``).  A subclass may
declare its own ``hypers`` (another default, another option set) and shares the maths.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = [
    "KW_ONLY",
    "REQUIRED",
    "Hyper",
    "HyperSpec",
    "adam_hypers",
    "betas",
    "check_betas",
    "check_clip",
    "check_lr",
    "check_nesterov",
    "check_nonneg",
    "flag",
    "integer",
    "lr",
    "nonneg",
    "option",
    "with_max_lr_snapshot",
]

#: the default of a hyperparameter that has none (the caller must give it)
REQUIRED: Any = inspect.Parameter.empty

# --------------------------------------------------------------------------- checks


def check_lr(lr: Any, name: str = "lr", allow_none: bool = False) -> None:
    """Raise ValueError unless ``lr`` is a finite number >= 0 (or None when allowed)."""
    if lr is None and allow_none:
        return
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got shape {tuple(lr.shape)}"
            )
        lr = float(lr)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise ValueError(f"{name} must be a number, got {type(lr).__name__}")
    if not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid {name}: {lr} (must be finite and >= 0)")


def check_nonneg(value: Any, name: str) -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be finite and >= 0)")


def check_betas(betas: Any, n: int = 2, name: str = "betas") -> None:
    """Raise ValueError unless ``betas`` is a sequence of ``n`` numbers in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        raise ValueError(f"{name} must be a tuple of {n} numbers in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not (0.0 <= b < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: name, default, validator and the annotation shown in the signature.

    ``check(name, value)`` raises ValueError for a bad value and returns the value to store in
    the param groups; None stores the value as given.
    """

    name: str
    default: Any = REQUIRED
    check: Callable[[str, Any], Any] | None = None
    annotation: str = "Any"

    def validate(self, value: Any) -> Any:
        """The value to store, after the validator (which raises ValueError when it is bad)."""
        return value if self.check is None else self.check(self.name, value)


class _KwOnly:
    def __repr__(self) -> str:
        return "KW_ONLY"


#: in a :class:`HyperSpec`, the entries after this marker are keyword-only
KW_ONLY: Any = _KwOnly()


class HyperSpec:
    """The ordered hyperparameters of one optimizer (see the module docstring).

    ``params_annotation`` is the annotation of the leading ``params`` argument.
    """

    def __init__(self, *entries: Hyper | _KwOnly, params_annotation: str = "Iterable") -> None:
        P = inspect.Parameter
        kind = P.POSITIONAL_OR_KEYWORD
        hypers: list[Hyper] = []
        sig = [
            P("self", P.POSITIONAL_OR_KEYWORD),
            P("params", P.POSITIONAL_OR_KEYWORD, annotation=params_annotation),
        ]
        for e in entries:
            if e is KW_ONLY:
                kind = P.KEYWORD_ONLY
                continue
            if not isinstance(e, Hyper):
                raise TypeError(f"HyperSpec entries are Hyper objects or KW_ONLY, got {e!r}")
            if e.name in ("self", "params") or any(h.name == e.name for h in hypers):
                raise ValueError(f"hyperparameter name {e.name!r} is reserved or declared twice")
            hypers.append(e)
            sig.append(P(e.name, kind, default=e.default, annotation=e.annotation))
        self.entries: tuple[Hyper, ...] = tuple(hypers)
        #: the constructor's signature, ``self`` and ``params`` included
        self.signature = inspect.Signature(sig, return_annotation="None")

    def __iter__(self) -> Iterator[Hyper]:
        return iter(self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        """The hyperparameter names, in constructor order."""
        return tuple(h.name for h in self.entries)

    def bind(
        self, owner: str, obj: Any, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """``(params, validated hyperparameters)`` of a constructor call ``owner(*args, **kwargs)``."""
        try:
            bound = self.signature.bind(obj, *args, **kwargs)
        except TypeError as exc:
            allowed = ", ".join(("params",) + self.names)
            raise TypeError(f"{owner}.__init__(): {exc} (its parameters: {allowed})") from None
        bound.apply_defaults()
        values = bound.arguments
        return values["params"], {h.name: h.validate(values[h.name]) for h in self.entries}


# --------------------------------------------------------------------------- entry builders


def lr(default: Any = 1e-3, *, optional: bool = False) -> Hyper:
    """The learning rate ``lr``: a finite number >= 0 (a one-element tensor too), or None when
    ``optional``."""

    def check(name: str, value: Any) -> Any:
        check_lr(value, name, allow_none=optional)
        return value

    return Hyper("lr", default, check, "float | None" if optional else "float")


def nonneg(
    name: str,
    default: Any,
    *,
    at_most: float | None = None,
    below: float | None = None,
    optional: bool = False,
) -> Hyper:
    """A finite number >= 0, with an optional upper bound (``at_most``: <=, ``below``: <);
    None is allowed when ``optional``."""
    if at_most is not None:
        allowed = f"[0, {at_most:g}]"
    elif below is not None:
        allowed = f"[0, {below:g})"
    else:
        allowed = ""

    def check(n: str, value: Any) -> Any:
        if value is None and optional:
            return value
        check_nonneg(value, n)
        if (at_most is not None and value > at_most) or (below is not None and value >= below):
            raise ValueError(f"Invalid {n}: {value} (must be in {allowed})")
        return value

    return Hyper(name, default, check, "float | None" if optional else "float")


def betas(default: Any = (0.9, 0.999), name: str = "betas", n: int = 2) -> Hyper:
    """A tuple of ``n`` coefficients in [0, 1) (a list is stored as a tuple)."""

    def check(nm: str, value: Any) -> Any:
        check_betas(value, n, nm)
        return tuple(value)

    return Hyper(name, default, check, f"tuple[{', '.join(['float'] * n)}]")


def flag(name: str, default: bool) -> Hyper:
    """A switch, stored as given (like torch.optim's options)."""
    return Hyper(name, default, None, "bool")


def integer(name: str, default: Any, *, minimum: int | None = None) -> Hyper:
    """An integer (not a bool), ``>= minimum`` when given."""

    def check(n: str, value: Any) -> Any:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (minimum is not None and value < minimum)
        ):
            bound = "" if minimum is None else f" >= {minimum}"
            raise ValueError(f"Invalid {n}: {value!r} (must be an integer{bound})")
        return value

    return Hyper(name, default, check, "int")


def option(
    name: str, default: Any, annotation: str = "Any", check: Callable[[str, Any], Any] | None = None
) -> Hyper:
    """Any other hyperparameter: stored as ``check(name, value)`` returns it (as given without one)."""
    return Hyper(name, default, check, annotation)


def check_nesterov(hypers: dict[str, Any]) -> None:
    """Raise ValueError when ``nesterov`` is set without a momentum or with a dampening."""
    if hypers["nesterov"] and (hypers["momentum"] <= 0 or hypers["dampening"] != 0):
        raise ValueError("Nesterov momentum requires momentum > 0 and zero dampening")


def check_clip(name: str, value: Any) -> Any:
    """A clipping threshold: None (no clipping) or a finite number > 0 (an entry validator)."""
    if value is None:
        return value
    check_nonneg(value, name)
    if value == 0:
        raise ValueError(f"Invalid {name}: 0 (use None to disable clipping)")
    return value


def with_max_lr_snapshot(hypers: dict[str, Any]) -> dict[str, Any]:
    """``hypers`` plus ``max_lr_snapshot``, the constructor's lr that ``corrected_weight_decay``
    divides by (timm's corrected decay ``lr**2 / max_lr``); it must then be positive."""
    max_lr = float(hypers["lr"])
    if hypers["corrected_weight_decay"] and max_lr <= 0.0:
        raise ValueError(
            f"corrected_weight_decay needs a positive max lr, got {max_lr}: construct the "
            "optimizer with the peak lr"
        )
    return {**hypers, "max_lr_snapshot": max_lr}


def adam_hypers(
    lr_default: Any,
    *,
    betas_default: Any = (0.9, 0.999),
    eps_default: float = 1e-8,
    weight_decay_default: float = 0.0,
) -> tuple[Hyper, Hyper, Hyper, Hyper]:
    """``lr, betas, eps, weight_decay``: the leading hyperparameters of the Adam family, with
    these defaults (splice them in with ``HyperSpec(*adam_hypers(1e-3), ...)``)."""
    return (
        lr(lr_default),
        betas(betas_default),
        nonneg("eps", eps_default),
        nonneg("weight_decay", weight_decay_default),
    )
