"""Lookahead: k fast steps forward, one interpolation step back (Zhang et al., 2019).

Wraps any optimizer (a distopt one or a plain ``torch.optim`` one).  The slow-weight update is
element-wise, so it needs no reduction and runs unchanged on dim-0 shards (ZeRO) and on the
local tensors of DTensor parameters (FSDP2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from distopt._dtensor import local_tensor
from distopt.optim._core import MASTER_KEY

__all__ = ["Lookahead"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SLOW = "lookahead_slow_buff"
_GROUP_KEYS = ("lookahead_alpha", "lookahead_k", "lookahead_step")


def _slow_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


class Lookahead(Optimizer):
    r"""Lookahead wrapper around any optimizer.

    Every step runs the base optimizer (the *fast* weights ``p``).  Every ``k`` steps of a param
    group, each of its parameters that has a gradient is pulled towards its slow copy::

        slow <- slow + alpha * (p - slow)
        p    <- slow

    As in timm, the slow copy ``lookahead_slow_buff`` of a parameter is created lazily, at the
    first synchronisation that sees the parameter with a gradient, from the fast weights at that
    moment (so the first synchronisation leaves the weights unchanged).  Slow copies of bf16/fp16
    parameters are kept in fp32; the interpolated value is rounded once into the parameter.

    The wrapper is a real :class:`torch.optim.Optimizer` that *shares* the base optimizer's
    ``param_groups`` and ``state``: LR schedulers, ``add_param_group`` and ``zero_grad`` work
    through it; ``state_dict()`` holds the base optimizer's state plus the slow copies (under
    ``lookahead_slow_buff`` in each parameter's state) and the group keys ``lookahead_alpha``,
    ``lookahead_k`` and ``lookahead_step`` — the layout timm's ``Lookahead`` checkpoints have.
    Hooks the sharding layer uses (``set_sharding``, ``shard_spec``, ``state_is_sharded``) are
    forwarded to the base optimizer.

    Args:
        base_optimizer: the optimizer that takes the fast steps.
        alpha: slow-weight step size in [0, 1] (default 0.5).
        k: number of fast steps between synchronisations, >= 1 (default 6).
    """

    def __init__(self, base_optimizer: Optimizer, alpha: float = 0.5, k: int = 6) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                f"Lookahead wraps a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid slow update rate alpha: {alpha!r} (must be in [0, 1])")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid lookahead steps k: {k!r} (must be an integer >= 1)")
        la_defaults = {"lookahead_alpha": float(alpha), "lookahead_k": int(k), "lookahead_step": 0}
        # Optimizer.__init__ runs for real (hooks, step patching, API logging).  It is handed a
        # placeholder group: the real groups are the base optimizer's, shared below.
        super().__init__([{"params": []}], {**base_optimizer.defaults, **la_defaults})
        self.__dict__.pop("_pending_param_groups", None)
        self.__dict__.pop("_pending_state", None)
        self._base_optimizer = base_optimizer
        self._lookahead_defaults = la_defaults
        for group in base_optimizer.param_groups:
            for key, value in la_defaults.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------ shared containers
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        base = self.__dict__.get("_base_optimizer")
        if base is None:  # only while Optimizer.__init__ runs
            return self.__dict__.setdefault("_pending_param_groups", [])
        return base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        base = self.__dict__.get("_base_optimizer")
        if base is None:
            self.__dict__["_pending_param_groups"] = value
        else:
            base.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        base = self.__dict__.get("_base_optimizer")
        if base is None:
            return self.__dict__.setdefault("_pending_state", {})
        return base.state

    @state.setter
    def state(self, value: Any) -> None:
        base = self.__dict__.get("_base_optimizer")
        if base is None:
            self.__dict__["_pending_state"] = value
        else:
            base.state = value

    @property
    def base_optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._base_optimizer

    @property
    def is_second_order(self) -> bool:
        """True when the base optimizer needs ``backward(create_graph=True)`` (Adahessian)."""
        return bool(getattr(self._base_optimizer, "is_second_order", False))

    def __getattr__(self, name: str) -> Any:
        # Public attributes the wrapper does not define come from the base optimizer (e.g.
        # Adafactor's ``relative_step_lrs`` for AdafactorSchedule).
        base = self.__dict__.get("_base_optimizer")
        if base is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ sharding hooks
    def set_sharding(self, specs: dict[Tensor, Any]) -> None:
        """Forward the sharding layer's shard specs to the base optimizer."""
        fn = getattr(self._base_optimizer, "set_sharding", None)
        if fn is None:
            raise TypeError(
                f"Lookahead: the base optimizer {type(self._base_optimizer).__name__} is not "
                "sharding-aware (no set_sharding); wrap a distopt optimizer instead"
            )
        fn(specs)

    def set_reducer(self, fn: Any) -> None:
        """Forward the reducer of shape-aware statistics to the base optimizer."""
        inner = getattr(self._base_optimizer, "set_reducer", None)
        if inner is not None:
            inner(fn)

    def shard_spec(self, p: Tensor) -> Any:
        """The base optimizer's shard spec of ``p`` (None when not sharded)."""
        fn = getattr(self._base_optimizer, "shard_spec", None)
        return None if fn is None else fn(p)

    def state_is_sharded(self, name: str, value: Any, param_shape: torch.Size) -> bool:
        """Whether a state tensor is row-sharded like its parameter (asks the base optimizer).

        The slow copy always is (it has the parameter's shape).
        """
        if name == _SLOW:
            return isinstance(value, Tensor) and value.dim() > 0 and len(param_shape) > 0
        fn = getattr(self._base_optimizer, "state_is_sharded", None)
        if fn is not None:
            return fn(name, value, param_shape)
        return isinstance(value, Tensor) and value.dim() > 0 and len(param_shape) > 0

    @property
    def _replicated_state_2d(self) -> frozenset[str]:
        return getattr(self._base_optimizer, "_replicated_state_2d", frozenset())

    @property
    def _needs_full_graph(self) -> bool:
        return bool(getattr(self._base_optimizer, "_needs_full_graph", False))

    # ------------------------------------------------------------------ optimizer API
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer, with the lookahead group defaults."""
        base = self.__dict__.get("_base_optimizer")
        if base is None:  # the placeholder group of Optimizer.__init__
            self.param_groups.append(param_group)
            return
        for key, value in self._lookahead_defaults.items():
            param_group.setdefault(key, value)
        base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base_optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One base-optimizer step, then a slow-weight synchronisation every ``k`` steps."""
        loss = self._base_optimizer.step() if closure is None else self._base_optimizer.step(closure)
        for group in self.param_groups:
            for key, value in self._lookahead_defaults.items():
                group.setdefault(key, value)
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"] == 0:
                self._update_slow(group)
        return loss

    @torch.no_grad()
    def sync_lookahead(self) -> None:
        """Synchronise every group now (e.g. before evaluating or saving a model).

        Then runs the hooks of :meth:`register_sync_post_hook` (distopt's ZeRO all-gathers the
        synchronised rows there, so that every rank holds the same full weights).
        """
        for group in self.param_groups:
            self._update_slow(group)
        for hook in list(self.__dict__.get("_sync_post_hooks", {}).values()):
            hook(self)

    def register_sync_post_hook(self, hook: Callable[[Optimizer], None]) -> Any:
        """Run ``hook(self)`` after every :meth:`sync_lookahead` call made outside ``step``.

        Returns a ``torch.utils.hooks.RemovableHandle``.
        """
        from collections import OrderedDict

        from torch.utils.hooks import RemovableHandle

        hooks = self.__dict__.setdefault("_sync_post_hooks", OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    @torch.no_grad()
    def _update_slow(self, group: dict[str, Any]) -> None:
        alpha = float(group.get("lookahead_alpha", self._lookahead_defaults["lookahead_alpha"]))
        same: tuple[list[Tensor], list[Tensor]] = ([], [])  # slow and fast of one dtype
        mixed: tuple[list[Tensor], list[Tensor]] = ([], [])  # fp32 slow, bf16/fp16 fast
        cast: tuple[list[Tensor], list[Tensor]] = ([], [])  # bf16/fp16 parameter, its fp32 master
        for p in group["params"]:
            if p.grad is None:
                continue
            fast = local_tensor(p).detach()
            st = self.state[p]
            master = st.get(MASTER_KEY)
            if master is not None:  # a distopt base keeps an fp32 master copy: the fast weights
                cast[0].append(fast)
                cast[1].append(master.view(fast.shape))
                fast = cast[1][-1]
            slow = st.get(_SLOW)
            if slow is None:
                slow = torch.empty_like(fast, dtype=_slow_dtype(fast))
                slow.copy_(fast)
                st[_SLOW] = slow
            lists = same if slow.dtype == fast.dtype else mixed
            lists[0].append(slow)
            lists[1].append(fast)
        if same[0]:
            torch._foreach_lerp_(same[0], same[1], alpha)
            torch._foreach_copy_(same[1], same[0])
        if mixed[0]:
            torch._foreach_lerp_(mixed[0], [f.to(s.dtype) for s, f in zip(*mixed)], alpha)
            torch._foreach_copy_(mixed[1], mixed[0])
        if cast[0]:
            torch._foreach_copy_(cast[0], cast[1])  # one cast of the new master into the parameter

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; it includes the slow copies and lookahead keys."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self._base_optimizer.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load base state and slow copies (also accepts a base-only or timm Lookahead dict)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        self._base_optimizer.load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self._lookahead_defaults.items():
                group.setdefault(key, value)
        # The base's loader casts every floating state tensor to the parameter's dtype; the slow
        # copies of bf16/fp16 parameters are fp32, so take them from the saved dict again.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_state = state_dict.get("state", {})
        for pid, p in zip(saved_ids, params):
            entry = saved_state.get(pid)
            if isinstance(entry, dict) and isinstance(entry.get(_SLOW), Tensor):
                local = local_tensor(p)
                self.state[p][_SLOW] = entry[_SLOW].to(
                    device=local.device, dtype=_slow_dtype(local), copy=True
                )
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __repr__(self) -> str:
        alpha = self._lookahead_defaults["lookahead_alpha"]
        k = self._lookahead_defaults["lookahead_k"]
        inner = "\n".join("    " + line for line in repr(self._base_optimizer).splitlines())
        return f"Lookahead(alpha={alpha}, k={k}) (\n{inner}\n)"
