"""PSGD Kron: Kronecker-factored preconditioners, one owner rank per tensor, shared random draws."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _kron as K
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import (
    KW_ONLY,
    HyperSpec,
    flag,
    integer,
    lr,
    nonneg,
    option,
    with_max_lr_snapshot,
)
from distopt.optim._whole import whole_map

__all__ = ["Kron"]

#: the param-group entry (of the first group) holding the state of the optimizer's random stream
RNG_KEY = "kron_rng_state"
#: the per-parameter state holding the packed Kronecker factors
FACTORS_KEY = "kron_factors"


def _probability(name: str, value: Any) -> Any:
    if value is None or callable(value):
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(
            f"Invalid {name}: {value!r} (a probability in (0, 1], a callable step -> probability, "
            "or None for the default schedule)"
        )
    return value


def _dtype_or_none(name: str, value: Any) -> Any:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"Invalid {name}: {value!r} (a floating torch.dtype or None)")
    return value


def _memory_mode(name: str, value: Any) -> Any:
    if value not in K.MEMORY_SAVE_MODES:
        raise ValueError(
            f"Invalid {name}: {value!r} (choose from None, 'one_diag', 'smart_one_diag', 'all_diag')"
        )
    return value


def _boolean(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (True or False)")
    return value


def _uniform(gen: torch.Generator) -> float:
    """One draw in [0, 1) from the shared stream."""
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def _seed(gen: torch.Generator) -> int:
    """One probe seed in [0, 2^31) from the shared stream."""
    return int(torch.randint(0, 2**31, (), generator=gen))


class Kron(DistOptimizer):
    r"""PSGD Kron (Xi-Lin Li's preconditioned SGD with Kronecker-factored preconditioners), with
    the options and defaults of timm's ``Kron`` (names ``kron``, ``kronw``, ``kronc``).

    Per parameter (``G`` the gradient, seen with dims ``flatten_start_dim..flatten_end_dim``
    merged when ``flatten``; ``Q = Q_1 (x) ... (x) Q_n``, see :mod:`distopt.optim._kron`)::

        m <- momentum * m + (1 - momentum) * G;   M = m / (1 - momentum^t)
        every 1/prob steps (prob: preconditioner_update_probability, default an annealed schedule):
            with probability 0.01: balance the factors' norms (>= 2-D tensors)
            V ~ N(0, I);  Q_k <- Q_k - precond_lr * (...)   (M, or G without momentum_into_precond_update)
        U  = Q^T Q M;   U <- U * min(1, 1.1 / (rms(U) + 1e-8))
        p <- p * (1 - s * wd)                 decoupled_decay (s = lr, or lr^2 / max_lr corrected)
        U <- U + wd * p                       otherwise
        p <- p - lr * U

    with ``wd = weight_decay`` (``2 u weight_decay``, ``u ~ U[0, 1)``, with
    ``stochastic_weight_decay``).  Factors are upper triangular, or diagonal for a dim of size 1,
    larger than ``max_size_triangular``, of a tensor with fewer than ``min_ndim_triangular`` dims,
    or chosen by ``memory_save_mode``.

    **Random draws.**  The balancing draw, the probe ``V`` and the stochastic decay come from
    one seeded stream of the optimizer (a CPU ``torch.Generator`` seeded with ``seed``), in
    parameter order: per parameter and step a uniform (balance), a probe seed when the factors
    are updated (``V`` is drawn with a generator seeded by it, of the tensor's shape, on its
    device), and a uniform for the stochastic decay.  Every rank draws the same numbers, never
    from the global RNG, and the stream's state is an entry of the first param group
    (``kron_rng_state``), so ``state_dict()`` and distopt checkpoints carry it and a resumed run
    continues the same draws.  This is the stream of timm's ``deterministic=True``; distopt is
    always deterministic (``deterministic`` is accepted for timm's signature, either value).

    **Sharded** (distopt ZeRO rows, FSDP2 ``Shard(0)``): each tensor has one owner rank,
    balanced by the cost of its update; the owner receives the rows of ``M`` (and of ``G`` when
    the factors see the gradient) together with the rows of the packed factors, updates the
    factors and computes ``U`` once, and every rank gets its rows of ``U`` and of the new factors
    back (:mod:`distopt.optim._whole`).  The factors are state of the rows (``kron_factors``:
    all factors flattened, concatenated and laid out as ``(rows, k)``), so checkpoints reshard
    like any row state; the owner holds them whole only during its step.  Results equal
    single-process training.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        momentum: momentum (default 0.9).
        weight_decay: weight decay, L2 unless ``decoupled_decay`` (default 0).
        preconditioner_update_probability: a probability, a callable ``step -> probability`` or
            None for the default schedule (1 for 500 steps, then annealed to 0.03) (default None).
        max_size_triangular: largest dim with a triangular factor (default 2048).
        min_ndim_triangular: fewest dims for triangular factors (default 2).
        memory_save_mode: None, ``"one_diag"``, ``"smart_one_diag"`` or ``"all_diag"``
            (default None).
        momentum_into_precond_update: update the factors from ``M`` rather than ``G`` (default True).
        precond_lr: the factors' step size (default 0.1).
        precond_init_scale: ``Q`` starts at this times the identity (default 1.0).
        mu_dtype: dtype of the momentum (default None: the parameter's).
        precond_dtype: dtype of the factors and of ``M`` (default None: the gradient's).
        decoupled_decay: decoupled weight decay (default False).
        corrected_weight_decay: decay by ``lr^2 / max_lr`` with ``decoupled_decay`` (default False).
        flatten: merge dims ``flatten_start_dim..flatten_end_dim`` (default False).
        flatten_start_dim: (default 2).
        flatten_end_dim: (default -1).
        stochastic_weight_decay: scale the decay by ``2 u`` per step (default False).
        deterministic: accepted for timm's signature; draws are always deterministic (default False).
        seed: seed of the optimizer's random stream (keyword-only, distopt; default 1337).

    State per parameter: ``step``, ``update_counter``, ``momentum_buffer`` and
    ``kron_factors``.
    """

    hypers = HyperSpec(
        lr(1e-3),
        nonneg("momentum", 0.9, below=1.0),
        nonneg("weight_decay", 0.0),
        option("preconditioner_update_probability", None, "float | Callable | None", _probability),
        integer("max_size_triangular", 2048, minimum=0),
        integer("min_ndim_triangular", 2, minimum=0),
        option("memory_save_mode", None, "str | None", _memory_mode),
        flag("momentum_into_precond_update", True),
        nonneg("precond_lr", 0.1),
        nonneg("precond_init_scale", 1.0),
        option("mu_dtype", None, "torch.dtype | None", _dtype_or_none),
        option("precond_dtype", None, "torch.dtype | None", _dtype_or_none),
        flag("decoupled_decay", False),
        flag("corrected_weight_decay", False),
        flag("flatten", False),
        integer("flatten_start_dim", 2),
        integer("flatten_end_dim", -1),
        flag("stochastic_weight_decay", False),
        option("deterministic", False, "bool", _boolean),
        KW_ONLY,
        integer("seed", 1337, minimum=0),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        hypers = dict(hypers)
        hypers.pop("deterministic")
        gen = torch.Generator(device="cpu").manual_seed(hypers.pop("seed"))
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or "
                f"dicts, but got {torch.typename(params)}"
            )
        params = list(params)
        if params:  # the stream lives in the first group (every other group draws from it)
            first = params[0]
            rng = {RNG_KEY: gen.get_state()}
            params = (
                [{**first, **rng}, *params[1:]]
                if isinstance(first, dict)
                else [{"params": params, **rng}]
            )
        return params, with_max_lr_snapshot(hypers)

    # ------------------------------------------------------------------ layout
    @staticmethod
    def _layout(group: dict[str, Any], shape: torch.Size) -> tuple[torch.Size, list[bool]]:
        fshape = K.flattened_shape(
            shape, group["flatten"], group["flatten_start_dim"], group["flatten_end_dim"]
        )
        diag = K.diagonal_dims(
            fshape, group["max_size_triangular"], group["min_ndim_triangular"],
            group["memory_save_mode"],
        )  # fmt: skip
        return fshape, diag

    @staticmethod
    def _rows(shape: torch.Size) -> int:
        return shape[0] if len(shape) else 1

    def _factor_width(self, group: dict[str, Any], shape: torch.Size) -> int:
        fshape, diag = self._layout(group, shape)
        return -(-K.factor_numel(fshape, diag) // self._rows(shape))

    @staticmethod
    def _precond_dtype(group: dict[str, Any], view: ParamView) -> torch.dtype:
        return group["precond_dtype"] or view.grad.dtype

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        view.state["step"] = self._step_tensor(view)
        view.state["update_counter"] = 0
        mu = group["mu_dtype"] or view.data.dtype
        view.state["momentum_buffer"] = torch.zeros_like(view.data, dtype=mu)
        # the factors are written by the owner at the first step (see _owner_update)
        view.state[FACTORS_KEY] = torch.zeros(
            (view.data.shape[0], self._factor_width(group, view.shape)),
            dtype=self._precond_dtype(group, view),
            device=view.data.device,
        )

    # ------------------------------------------------------------------ the step
    def _step_groups(
        self, groups: list[tuple[dict[str, Any], list[ParamView]]], ctx: StepContext
    ) -> None:
        holder = self.param_groups[0] if self.param_groups else {}
        state = holder.get(RNG_KEY)
        if state is None:
            raise RuntimeError(
                f"Kron: the first param group has no {RNG_KEY!r} (the state of the optimizer's "
                "random stream, created by the constructor and kept in its state_dict); it was "
                "removed or the param groups were replaced"
            )
        gen = torch.Generator(device="cpu")
        gen.set_state(state)
        ctx.extra["kron_generator"] = gen
        super()._step_groups(groups, ctx)
        holder[RNG_KEY] = gen.get_state()

    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        gen: torch.Generator = ctx.extra["kron_generator"]
        beta = group["momentum"]
        prob_opt = group["preconditioner_update_probability"]
        plan: list[dict[str, Any]] = []
        # bookkeeping and random draws: every rank, every parameter, in order
        for v in views:
            st = v.state
            step = int(st["step"])
            prob = K.update_probability(step) if prob_opt is None else prob_opt
            if callable(prob):
                prob = prob(step)
            st["update_counter"] += 1
            do_update = bool(st["update_counter"] >= 1 / prob)
            if do_update:
                st["update_counter"] = 0
            st["step"] += 1
            fshape, diag = self._layout(group, v.shape)
            balance = _uniform(gen) < 0.01 and do_update and len(fshape) > 1
            seed = _seed(gen) if do_update else None
            wd = group["weight_decay"]
            if wd != 0 and group["stochastic_weight_decay"]:
                wd = 2 * _uniform(gen) * wd
            plan.append(dict(first=step == 0, update=do_update, balance=balance, seed=seed,
                             wd=wd, fshape=fshape, diag=diag, t=step + 1))  # fmt: skip

        # momentum (row-wise), then the rows travel to the owners with the packed factors
        bufs = [v.state["momentum_buffer"] for v in views]
        for v, b in zip(views, bufs):
            b.mul_(beta).add_(v.grad, alpha=1 - beta)
        with_grad = not group["momentum_into_precond_update"]
        packed, shapes, costs = [], [], []
        for v, pl, b in zip(views, plan, bufs):
            pdt = self._precond_dtype(group, v)
            debiased = (b / (1 - beta ** pl["t"])).to(pdt)
            rows, n = v.data.shape[0], math.prod(v.shape[1:])
            fac = v.state[FACTORS_KEY]
            dtype = torch.promote_types(torch.promote_types(pdt, fac.dtype), v.data.dtype)
            parts = [debiased.reshape(rows, n)]
            if with_grad:
                parts.append(v.grad.to(pdt).reshape(rows, n))
            parts.append(fac)
            packed.append(torch.cat([t.to(dtype) for t in parts], dim=1))
            width = packed[-1].shape[1]
            shapes.append(torch.Size([self._rows(v.shape), width]))
            costs.append(K.kron_cost(pl["fshape"], pl["diag"]))

        fn = self._owner_fn(group, views, plan, with_grad)
        results = whole_map(self, ctx, views, packed, fn, costs, shapes)

        lr = group["lr"]
        for v, pl, res in zip(views, plan, results):
            n = math.prod(v.shape[1:])
            update = res[:, :n].reshape(v.data.shape).to(v.data.dtype)
            fac = v.state[FACTORS_KEY]
            fac.copy_(res[:, res.shape[1] - fac.shape[1] :])
            wd = pl["wd"]
            if wd != 0:
                if group["decoupled_decay"]:
                    s = lr**2 / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr
                    v.data.mul_(1.0 - s * wd)
                else:
                    update.add_(v.data, alpha=wd)
            if isinstance(lr, Tensor):
                v.data.add_(update * -lr)
            else:
                v.data.add_(update, alpha=-lr)

    def _owner_fn(
        self,
        group: dict[str, Any],
        views: list[ParamView],
        plan: list[dict[str, Any]],
        with_grad: bool,
    ) -> Callable[[list[Tensor], list[int]], list[Tensor]]:
        """The work of the owner: whole packed tensors in, whole packed results out."""

        def fn(whole: list[Tensor], idx: list[int]) -> list[Tensor]:
            out = []
            for w, i in zip(whole, idx):
                v, pl = views[i], plan[i]
                shape = v.shape if len(v.shape) else torch.Size([1])
                numel = math.prod(shape)
                pdt = self._precond_dtype(group, v)
                fdt = v.state[FACTORS_KEY].dtype
                flat = w.reshape(-1, w.shape[-1])
                cols = flat.shape[1]
                n = numel // shape[0]
                mom = flat[:, :n].reshape(pl["fshape"]).to(pdt)
                grad = flat[:, n : 2 * n].reshape(pl["fshape"]).to(pdt) if with_grad else mom
                fcols = cols - n * (2 if with_grad else 1)
                # the factors: views of one buffer (one copy in from the packed columns, one
                # copy back), updated in place; the result goes into the tensor that came in
                rows = flat.shape[0]
                tail = flat[:, cols - fcols :]
                buf = torch.empty(rows * fcols, dtype=fdt, device=w.device)
                factors = _factor_views(buf, pl["fshape"], pl["diag"])
                if pl["first"]:
                    buf.zero_()
                    init = K.init_factors(
                        pl["fshape"], pl["diag"], group["precond_init_scale"], fdt, w.device
                    )
                    for q, q0 in zip(factors, init):
                        q.copy_(q0)
                else:
                    buf.view(rows, fcols).copy_(tail)
                if pl["balance"]:
                    K.balance_(factors)
                if pl["update"]:
                    g = torch.Generator(device=w.device).manual_seed(pl["seed"])
                    probe = torch.randn(pl["fshape"], generator=g, dtype=pdt, device=w.device)
                    K.update_factors_(factors, grad, probe, group["precond_lr"])
                pre = K.apply_preconditioner(factors, mom).to(v.data.dtype)
                pre = pre * torch.clamp(1.1 / (pre.square().mean().sqrt() + 1e-8), max=1.0)
                # (mom and grad may be views of flat: read before these writes)
                flat[:, :n] = pre.reshape(rows, n)
                tail.copy_(buf.view(rows, fcols))
                out.append(flat.view(w.shape))
            return out

        return fn


def _factor_views(buf: Tensor, shape: torch.Size, diag: list[bool]) -> list[Tensor]:
    """The factors as views of the flat buffer ``buf`` (a vector for a diagonal factor, a
    ``(d, d)`` matrix otherwise), in order, from its start."""
    factors, offset = [], 0
    for d, dg in zip(shape, diag):
        n = d if dg else d * d
        q = buf[offset : offset + n]
        factors.append(q if dg else q.view(d, d))
        offset += n
    return factors
