"""Schedule-free AdamW, SGD and RAdam (Defazio et al., 2024, "The Road Less Scheduled",
arXiv:2405.15682), with the update rules, options and defaults of facebookresearch/schedule_free
(``AdamWScheduleFree``, ``SGDScheduleFree``, ``RAdamScheduleFree``, release 1.4).

Three sequences replace the learning-rate schedule: ``z`` (the base optimizer's iterate), ``x``
(a weighted running average of ``z``: the weights to evaluate) and ``y`` (their interpolation,
where gradients are taken)::

    y = (1 - beta) * z + beta * x          beta: betas[0] (AdamW, RAdam) or momentum (SGD)
    z <- z - lr_t * u                      u: the base direction at y (Adam-normalised or plain)
    x <- (1 - c) * x + c * z               c = w_t / sum(w_1..w_t),  w_t = t^r * lr_max^weight_lr_power

The parameters hold ``y`` in train mode and ``x`` in eval mode; only ``z`` (and the Adam second
moment) are stored, and ``x`` is recovered from ``y`` and ``z``.  :meth:`train` and :meth:`eval`
switch the parameters between the two (``optimizer.train()`` before training steps,
``optimizer.eval()`` before evaluating or exporting weights).  The mode is kept in every param
group (``train_mode``), so ``state_dict()`` records it and ``load_state_dict`` restores it.

Everything is element-wise: the per-group scalars (``k``, ``lr_max``, ``weight_sum``) are the
same on every rank, and ``z``/``exp_avg_sq`` are ordinary per-parameter state tensors, so ZeRO row
shards and FSDP2 local shards update exactly as one process would, and checkpoints reshard them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from distopt._dtensor import is_dtensor, local_tensor
from distopt.optim import _core
from distopt.optim import _kernel as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, betas, flag, integer, lr, nonneg

__all__ = ["AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree", "ScheduleFreeBase"]

#: the fp32 master copy of a bf16/fp16 tensor, where the core keeps one (else None)
_MASTER_KEY: str | None = getattr(_core, "MASTER_KEY", None)
_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: the group entries of the schedule-free bookkeeping (the reference's names)
_BOOKKEEPING = {"k": 0, "train_mode": False, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}


def _eval_mode_error(owner: str, action: str) -> RuntimeError:
    return RuntimeError(
        f"{owner} is in eval mode (the parameters hold the averaged weights x, not the training "
        f"iterate y): {action}. Call optimizer.train() first (the Trainer and "
        "distopt.integrations do it before each training step); call optimizer.eval() only "
        "around evaluation or to export inference weights (model.state_dict() alone)."
    )


class ScheduleFreeBase(DistOptimizer):
    """What the three schedule-free optimizers share: the modes, the averaging weights and
    ``y``'s interpolation.  Subclasses give :meth:`_beta` (and :meth:`_adaptive`, :meth:`_lr_factor`)."""

    elementwise = True

    # ------------------------------------------------------------------ construction
    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        beta = self._beta(hypers)
        if not 0.0 < beta < 1.0:
            name = "momentum" if "momentum" in hypers else "betas[0]"
            raise ValueError(
                f"{type(self).__name__}: {name} must be in (0, 1) exclusive, got {beta!r} (the "
                "averaged weights x are recovered from y and z through it)"
            )
        return params, {**hypers, **_BOOKKEEPING}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``; a group added later joins the current mode."""
        mode = self.param_groups[0]["train_mode"] if getattr(self, "param_groups", None) else None
        super().add_param_group(param_group)
        if mode is not None:
            self.param_groups[-1]["train_mode"] = mode

    # ------------------------------------------------------------------ modes
    @property
    def train_mode(self) -> bool:
        """True when the parameters hold ``y`` (training), False when they hold ``x`` (eval)."""
        return all(bool(g["train_mode"]) for g in self.param_groups)

    @torch.no_grad()
    def train(self) -> None:
        """Put ``y`` into the parameters (``p <- lerp(x, z, 1 - beta)``); a no-op in train mode.

        Collective under distopt ZeRO (the changed rows are all-gathered): call it on every rank.
        """
        self._switch(True)

    @torch.no_grad()
    def eval(self) -> None:
        """Put ``x`` into the parameters (``p <- lerp(y, z, 1 - 1/beta)``); a no-op in eval mode.

        Collective under distopt ZeRO (the changed rows are all-gathered): call it on every rank.
        """
        self._switch(False)

    def _switch(self, to_train: bool) -> None:
        changed = False
        for group in self.param_groups:
            if bool(group["train_mode"]) == to_train:
                continue
            beta = self._beta(group)
            weight = 1.0 - beta if to_train else 1.0 - 1.0 / beta
            pairs = [(p, self.state[p]) for p in group["params"] if "z" in self.state.get(p, {})]
            if pairs:
                self._refuse_foreign(group)
                self._lerp_params(pairs, weight)
            group["train_mode"] = to_train
            changed = True  # decided from the replicated mode alone: every rank runs the hooks
        if changed:
            for hook in list(self.__dict__.get("_sync_post_hooks", {}).values()):
                hook(self)

    def _refuse_foreign(self, group: dict[str, Any]) -> None:
        own = self.__dict__.get("_own_params", set())
        foreign = [
            p for p in group["params"]
            if id(p) not in own and id(p) not in self._shard_specs and not is_dtensor(p)
        ]  # fmt: skip
        if foreign:
            raise RuntimeError(
                f"{type(self).__name__}.train()/eval(): {len(foreign)} param-group tensors were "
                "replaced by another engine (DeepSpeed ZeRO or its fp16/bf16 wrapper hands the "
                "optimizer flat partitions), so switching between y and x would not reach the "
                "model's weights. Use distopt.shard (ZeRO-1/2), FSDP2, DDP or DeepSpeed stage 0 "
                "in fp32 with a schedule-free optimizer."
            )

    @staticmethod
    def _lerp_params(pairs: list[tuple[Tensor, dict]], weight: float) -> None:
        same: tuple[list[Tensor], list[Tensor]] = ([], [])
        cast: list[tuple[Tensor, Tensor, Tensor | None]] = []
        for p, st in pairs:
            local = local_tensor(p).detach()
            z = st["z"]
            local = local.view(z.shape) if local.dim() == 0 else local
            master = st.get(_MASTER_KEY) if _MASTER_KEY is not None else None
            if master is not None and local.dtype in _LOW_PRECISION:
                cast.append((local, z, master.view(z.shape)))
            elif local.dtype != z.dtype:
                cast.append((local, z, None))
            else:
                same[0].append(local)
                same[1].append(z)
        if same[0]:
            torch._foreach_lerp_(same[0], same[1], weight)
        for local, z, master in cast:  # bf16/fp16 parameters: the lerp in fp32, one cast back
            full = master if master is not None else local.float()
            full.lerp_(z, weight)
            local.copy_(full)

    def register_sync_post_hook(self, hook: Callable[[Optimizer], None]) -> Any:
        """Run ``hook(self)`` after :meth:`train` / :meth:`eval` changed the parameters.

        distopt ZeRO registers its all-gather here (each rank switches its own rows; the hook
        brings every rank the others').  Returns a ``torch.utils.hooks.RemovableHandle``.
        """
        from torch.utils.hooks import RemovableHandle

        hooks = self.__dict__.setdefault("_sync_post_hooks", OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def check_checkpointable(self) -> None:
        """Raise unless a resumable checkpoint can be taken now (train mode, or no state yet).

        :func:`distopt.checkpoint.save` calls it: in eval mode the parameters hold ``x``, and a
        checkpoint of them with ``z`` would resume from the wrong weights (and never bitwise).
        """
        if not self.train_mode and any("z" in st for st in self.state.values()):
            raise _eval_mode_error(
                type(self).__name__, "a resumable checkpoint must be saved in train mode"
            )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One schedule-free step (parameters hold ``y``); raises in eval mode."""
        if not self.train_mode:
            raise _eval_mode_error(type(self).__name__, "step() was called")
        return super().step(closure)

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["z"] = view.data.clone(memory_format=torch.preserve_format)
        if self._has_second_moment:
            view.state["exp_avg_sq"] = self._zeros(view)

    _has_second_moment = True

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        k = int(group["k"])
        lr_t = float(group["lr"]) * self._lr_factor(group, k)
        group["scheduled_lr"] = lr_t
        lr_max = group["lr_max"] = max(lr_t, float(group["lr_max"]))
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] = float(group["weight_sum"]) + weight
        ckp1 = weight / weight_sum if weight_sum != 0.0 else 0.0
        group["k"] = k + 1
        if not views:
            return
        adam = self._has_second_moment
        beta2 = group["betas"][1] if adam else 0.0
        scalars = {
            "beta2": beta2, "bc2": 1.0 - beta2 ** (k + 1), "eps": group.get("eps", 0.0),
            "adaptive": float(adam and self._adaptive(group, k + 1)), "wd": group["weight_decay"],
            "ckp1": ckp1, "y_step": lr_t * (self._beta(group) * (1.0 - ckp1) - 1.0), "z_step": -lr_t,
        }  # fmt: skip
        K.apply(self, schedule_free_rule, views, ("z", "exp_avg_sq") if adam else ("z",), scalars,
                adam=adam, decay=group["weight_decay"] != 0.0)  # fmt: skip

    # ------------------------------------------------------------------ for subclasses
    def _beta(self, group: dict[str, Any]) -> float:  # pragma: no cover
        raise NotImplementedError

    def _lr_factor(self, group: dict[str, Any], k: int) -> float:
        """The linear warmup: ``(k + 1) / warmup_steps`` for the first ``warmup_steps`` steps."""
        warmup = group["warmup_steps"]
        return (k + 1) / warmup if k < warmup else 1.0

    def _adaptive(self, group: dict[str, Any], step: int) -> bool:
        """Whether the direction at ``step`` is Adam-normalised (else the plain gradient); the
        second moment moves either way."""
        return True


def schedule_free_rule(
    p: Tensor, g: Tensor, st: dict[str, Tensor], s: dict[str, Tensor], *, adam: bool, decay: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """One tensor's schedule-free step (``p`` holds ``y``; see :class:`AdamWScheduleFree`).

    The direction ``u``: with ``adam`` the gradient over ``sqrt(v / (1 - beta2^t)) + eps`` where
    ``s["adaptive"]`` (else the gradient), then ``+ wd * y``; ``y <- lerp(y, z, c) + y_step * u``,
    ``z <- z + z_step * u``.  ``a + c * b`` is written ``addcmul(a, b, c)``: rounded as the
    reference's ``add_(b, alpha=c)`` (one fused multiply-add), so the eager form is bitwise
    schedulefree's."""
    new = {}
    u = g
    if adam:
        v = K.ema_sq(st["exp_avg_sq"], g, s["beta2"])
        new["exp_avg_sq"] = v
        u = torch.where(s["adaptive"] > 0, g / ((v / s["bc2"]).sqrt() + s["eps"]), g)
    if decay:
        u = torch.addcmul(u, p, s["wd"])
    z = st["z"]
    new["z"] = torch.addcmul(z, u, s["z_step"])
    return torch.addcmul(torch.lerp(p, z, s["ckp1"]), u, s["y_step"]), new


class AdamWScheduleFree(ScheduleFreeBase):
    r"""Schedule-free AdamW (name ``adamw_schedulefree``; Trainer ``schedule_free_adamw``).

    Update rule at step ``t = k + 1`` (element-wise; ``y`` is the parameter)::

        lr_t  = lr * min(1, t / warmup_steps)
        lr_max = max(lr_max, lr_t);  w = t^r * lr_max^weight_lr_power;  S += w;  c = w / S
        v <- beta2 * v + (1 - beta2) * g^2
        u  = g / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * y
        y <- (1 - c) * y + c * z + lr_t * (beta1 * (1 - c) - 1) * u
        z <- z - lr_t * u

    Args:
        params: parameters or param groups.
        lr: learning rate (default 0.0025).
        betas: ``(beta1, beta2)``: the interpolation ``y = (1 - beta1) z + beta1 x`` and the
            second-moment decay (default (0.9, 0.999)); beta1 in (0, 1).
        eps: added to the root of the second moment (default 1e-8).
        weight_decay: decay at ``y``, added to the normalised direction (default 0).
        warmup_steps: linear warmup of the lr over this many steps (default 0).
        r: polynomial weighting ``t^r`` of the average (default 0).
        weight_lr_power: the averaging weights are ``lr_max^weight_lr_power`` (default 2).

    Modes: ``optimizer.train()`` before training steps (a new optimizer starts in eval mode, as
    the reference's), ``optimizer.eval()`` before evaluating or exporting the averaged weights;
    ``step()`` and :func:`distopt.checkpoint.save` raise in eval mode.  Per param group: ``k``,
    ``lr_max``, ``weight_sum``, ``scheduled_lr`` and ``train_mode`` (the reference's bookkeeping).
    State per parameter: ``z``, ``exp_avg_sq``.
    """

    hypers = HyperSpec(
        lr(0.0025),
        betas((0.9, 0.999)),
        nonneg("eps", 1e-8),
        nonneg("weight_decay", 0.0),
        integer("warmup_steps", 0, minimum=0),
        nonneg("r", 0.0),
        nonneg("weight_lr_power", 2.0),
    )

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]


class SGDScheduleFree(ScheduleFreeBase):
    r"""Schedule-free SGD (name ``sgd_schedulefree``; Trainer ``schedule_free_sgd``).

    Update rule at step ``t = k + 1`` (element-wise; ``y`` is the parameter)::

        lr_t, c as for AdamWScheduleFree
        u  = g + weight_decay * y
        y <- (1 - c) * y + c * z + lr_t * (momentum * (1 - c) - 1) * u
        z <- z - lr_t * u

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1.0).
        momentum: the interpolation ``y = (1 - momentum) z + momentum x``, in (0, 1) (default 0.9).
        weight_decay: L2 decay at ``y`` (default 0).
        warmup_steps: linear warmup of the lr over this many steps (default 0).
        r: polynomial weighting ``t^r`` of the average (default 0).
        weight_lr_power: the averaging weights are ``lr_max^weight_lr_power`` (default 2).

    Modes: ``optimizer.train()`` before training steps (a new optimizer starts in eval mode, as
    the reference's), ``optimizer.eval()`` before evaluating or exporting the averaged weights;
    ``step()`` and :func:`distopt.checkpoint.save` raise in eval mode.  Per param group: ``k``,
    ``lr_max``, ``weight_sum``, ``scheduled_lr`` and ``train_mode`` (the reference's bookkeeping).
    State per parameter: ``z``.
    """

    _has_second_moment = False

    hypers = HyperSpec(
        lr(1.0),
        nonneg("momentum", 0.9, below=1.0),
        nonneg("weight_decay", 0.0),
        integer("warmup_steps", 0, minimum=0),
        nonneg("r", 0.0),
        nonneg("weight_lr_power", 2.0),
    )

    def _beta(self, group: dict[str, Any]) -> float:
        return group["momentum"]


class RAdamScheduleFree(ScheduleFreeBase):
    r"""Schedule-free RAdam (name ``radam_schedulefree``; Trainer ``schedule_free_radam``).

    No warmup option: RAdam's rectification is the warmup.  At step ``t = k + 1``, with
    ``rho_inf = 2 / (1 - beta2) - 1`` and ``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)``::

        rect = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))  if rho_t > 4
               else 0 if silent_sgd_phase else 1
        lr_t = lr * rect;  lr_max, c as for AdamWScheduleFree
        v <- beta2 * v + (1 - beta2) * g^2
        u  = g / (sqrt(v / (1 - beta2^t)) + eps) if rho_t > 4 else g;   u <- u + weight_decay * y
        y <- (1 - c) * y + c * z + lr_t * (beta1 * (1 - c) - 1) * u
        z <- z - lr_t * u

    Args:
        params: parameters or param groups.
        lr: learning rate (default 0.0025).
        betas: ``(beta1, beta2)`` (default (0.9, 0.999)); beta1 in (0, 1).
        eps: added to the root of the second moment (default 1e-8).
        weight_decay: decay at ``y`` (default 0).
        r: polynomial weighting ``t^r`` of the average (default 0).
        weight_lr_power: the averaging weights are ``lr_max^weight_lr_power`` (default 2).
        silent_sgd_phase: no parameter change while ``rho_t <= 4`` (only the second moment
            moves); False takes plain SGD steps then (default True).

    Modes: ``optimizer.train()`` before training steps (a new optimizer starts in eval mode, as
    the reference's), ``optimizer.eval()`` before evaluating or exporting the averaged weights;
    ``step()`` and :func:`distopt.checkpoint.save` raise in eval mode.  Per param group: ``k``,
    ``lr_max``, ``weight_sum``, ``scheduled_lr`` and ``train_mode`` (the reference's bookkeeping).
    State per parameter: ``z``, ``exp_avg_sq``.
    """

    hypers = HyperSpec(
        lr(0.0025),
        betas((0.9, 0.999)),
        nonneg("eps", 1e-8),
        nonneg("weight_decay", 0.0),
        nonneg("r", 0.0),
        nonneg("weight_lr_power", 2.0),
        KW_ONLY,
        flag("silent_sgd_phase", True),
    )

    @staticmethod
    def _rho(group: dict[str, Any], step: int) -> tuple[float, float]:
        beta2 = group["betas"][1]
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        bt = beta2**step
        return rho_inf, rho_inf - 2.0 * step * bt / (1.0 - bt)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _lr_factor(self, group: dict[str, Any], k: int) -> float:
        rho_inf, rho_t = self._rho(group, k + 1)
        if rho_t > 4.0:
            return math.sqrt(
                (rho_t - 4.0)
                * (rho_t - 2.0)
                * rho_inf
                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
            )
        return float(not group["silent_sgd_phase"])

    def _adaptive(self, group: dict[str, Any], step: int) -> bool:
        return self._rho(group, step)[1] > 4.0
