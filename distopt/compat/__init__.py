"""Facades with the names, signatures and defaults of timm.optim and transformers.optimization.

Migration is a one-line import change::

    from distopt.compat.timm import create_optimizer_v2          # was: from timm.optim import ...
    from distopt.compat import transformers as optimization     # was: from transformers import optimization

Submodules: :mod:`distopt.compat.timm`, :mod:`distopt.compat.transformers`.

How the facade classes are built (the helpers below):

A facade is a subclass of a distopt optimizer whose ``__init__`` has exactly the seed's
parameter names, order and defaults.  Its arguments are forwarded by name to the distopt class
(through an alias table where the names differ).  Arguments the distopt class has no use for
are accepted when they are at the seed default (or are pure implementation switches such as
``foreach`` and ``fused``: distopt is always multi-tensor) and raise ``NotImplementedError``
otherwise — a facade never silently changes the maths.

Facade classes are built on first access (module ``__getattr__``), so a facade whose distopt
class has not been installed does not break the import of the others.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from distopt.optim._factory import _accepted

_logger = logging.getLogger("distopt.compat")

#: implementation switches accepted and ignored (any value)
IGNORED = frozenset({"foreach", "fused"})
#: switches distopt cannot honour: accepted only when false
UNSUPPORTED_TRUE = frozenset({"capturable", "differentiable"})


def forward_init(self: Any, params: Any, args: dict[str, Any], aliases: dict[str, str] | None = None) -> None:
    """Call the distopt base ``__init__`` of facade ``self`` with the seed-named ``args``."""
    cls = type(self)
    facade = cls._facade_name
    base = cls._distopt_base
    seed_sig = inspect.signature(cls._seed_init)
    defaults = {n: p.default for n, p in seed_sig.parameters.items()}
    accepted, var_kw = _accepted(base)
    aliases = aliases or {}
    out: dict[str, Any] = {}
    for name, value in args.items():
        if name in ("self", "params", "__class__"):
            continue
        if name in accepted or var_kw:
            out[name] = value
        elif aliases.get(name) in accepted:
            out[aliases[name]] = value
        elif name in IGNORED:
            if value is not None:
                _logger.debug("%s: %s=%r ignored (distopt optimizers are always multi-tensor)",
                              facade, name, value)
        elif name in UNSUPPORTED_TRUE:
            if value:
                raise NotImplementedError(f"{facade}: {name}=True is not supported by distopt")
        elif _same(value, defaults.get(name, inspect.Parameter.empty)):
            continue
        else:
            raise NotImplementedError(
                f"{facade}: {name}={value!r} is not supported by "
                f"{base.__module__}.{base.__qualname__} (only the default {defaults.get(name)!r})"
            )
    base.__init__(self, params, **out)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. a multi-element tensor
        return False


def make_facade(name: str, base: type, seed_init: Callable[..., None], doc: str, module: str) -> type:
    """A subclass of ``base`` named ``name`` whose ``__init__`` is ``seed_init``."""
    ns = {
        "__init__": seed_init,
        "__doc__": doc,
        "__module__": module,
        "_facade_name": f"{module}.{name}",
        "_distopt_base": base,
        "_seed_init": staticmethod(seed_init),
    }
    seed_init.__qualname__ = f"{name}.__init__"
    return type(name, (base,), ns)


def lazy_classes(module_globals: dict[str, Any], specs: dict[str, tuple[str, Callable[..., None], str]]):
    """A module ``__getattr__`` building the facade classes of ``specs`` on first access.

    ``specs[name] = (distopt class name, seed-signature __init__, docstring)``.
    """
    module = module_globals["__name__"]

    def __getattr__(attr: str) -> Any:
        spec = specs.get(attr)
        if spec is None:
            raise AttributeError(f"module {module!r} has no attribute {attr!r}")
        base_name, init, doc = spec
        import distopt.optim as optim

        base = getattr(optim, base_name, None)
        if base is None:
            raise AttributeError(
                f"{module}.{attr} needs distopt.optim.{base_name}, which is not available in this "
                "installation"
            )
        cls = make_facade(attr, base, init, doc, module)
        module_globals[attr] = cls
        return cls

    return __getattr__
