"""AdaHessian: an adaptive second-order optimizer (Yao et al., 2021)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _kernel as K
from distopt.optim._core import WRAPPER_STATE_KEYS, DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, adam_hypers, flag, integer, nonneg

__all__ = ["Adahessian"]

_MASK64 = (1 << 64) - 1


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser applied to each in turn)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def rademacher(like: Tensor, seed: int) -> Tensor:
    """A tensor of independent +-1 entries shaped like ``like``, from a generator seeded with ``seed``."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    z = torch.randint(0, 2, like.shape, generator=gen, device=like.device, dtype=like.dtype)
    return z.mul_(2).sub_(1)


class Adahessian(DistOptimizer):
    r"""AdaHessian, with the options and defaults of timm's implementation.

    Adam with the squared gradient replaced by the square of a Hutchinson estimate of the
    Hessian diagonal, ``D = E[z * (H z)]`` over Rademacher vectors ``z``.  Update rule for
    step ``t`` (element-wise once ``D`` is known)::

        D  = mean over n_samples of z * (H z)        (recomputed every update_each steps)
        D  <- mean(|D|) over the kernel's spatial dims (and broadcast)  if avg_conv_kernel and p is 4-D
        p  <- p * (1 - lr * weight_decay)            # decoupled decay
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * D^2
        p  <- p - lr / (1 - beta1^t) * m / ((v / (1 - beta2^t))^(k/2) + eps)     (k = hessian_power)

    **Usage.**  The Hessian-vector products differentiate the gradients, so the backward pass
    must keep its graph: ``loss.backward(create_graph=True)`` (``is_second_order`` is True, which
    timm's training script checks).  A step whose gradients have no graph raises a RuntimeError.

    **Reproducibility.**  No random state is kept: the Rademacher vector of a parameter comes
    from a generator seeded with a hash of (``seed``, the parameter's step count, its position
    among all the optimizer's parameters, the sample index).  Runs are reproducible and a
    ``state_dict`` round trip continues bit for bit.  The draws differ from timm's single
    running generator; the numbers agree with timm whenever the estimate does not depend on
    ``z`` (e.g. a diagonal Hessian) and are statistically equivalent otherwise.

    **Sharding.**  ``H z`` is a model-level computation: ``torch.autograd.grad`` of the whole
    gradients with respect to the whole parameters, through the model's graph.  A dim-0 shard
    of a parameter (ZeRO, FSDP2) is not part of that graph, so sharded parameters raise
    NotImplementedError; the sharding layer must compute the products at model level, or
    refuse this optimizer.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 0.1).
        betas: coefficients of the running averages of the gradient and of the squared Hessian
            diagonal (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay, scaled by lr (default 0).
        hessian_power: exponent ``k`` of the Hessian term, in [0, 1] (default 1).
        update_each: recompute the Hessian estimate every this many steps, reusing it in
            between (default 1).
        n_samples: Rademacher samples per estimate; optimizer-wide (default 1).
        avg_conv_kernel: average ``|D|`` over the spatial dims of 4-D (conv) weights (default False).
        seed: base seed of the Rademacher vectors; optimizer-wide (default 2147483647, timm's).

    State per parameter: ``step`` (float32 scalar), ``exp_avg``, ``exp_hessian_diag_sq`` and, when
    ``update_each > 1``, ``hess`` (the current estimate ``D``, kept so that a resumed run reuses it
    exactly); fp32 for bf16/fp16 parameters.
    """

    hypers = HyperSpec(
        *adam_hypers(0.1),
        nonneg("hessian_power", 1.0, at_most=1.0),
        integer("update_each", 1, minimum=1),
        integer("n_samples", 1, minimum=1),
        flag("avg_conv_kernel", False),
        KW_ONLY,
        integer("seed", 2147483647),
    )

    @property
    def is_second_order(self) -> bool:
        """True: the backward pass must be run with ``create_graph=True``."""
        return True

    _zero_state = ("exp_avg", "exp_hessian_diag_sq")

    def statistics_reads(self, group: dict[str, Any]) -> frozenset[str] | None:
        """What the update's whole-tensor statistics read (for ``distopt bench step``'s bytes
        per parameter): nothing; the update is element-wise given the Hessian estimate, whose
        Hessian-vector products are part of the backward pass (whole-model work: the reason
        Adahessian cannot run sharded), not of the update."""
        return frozenset()

    # ------------------------------------------------------------------ Hutchinson estimate
    def _hutchinson(self, views: list[ParamView], positions: list[int]) -> list[Tensor]:
        """``mean_s z_s * (H z_s)`` for each view (one autograd call per sample for all of them)."""
        n = self.defaults["n_samples"]
        seed = self.defaults["seed"]
        params = [v.param for v in views]
        grads = [v.param.grad for v in views]
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            raise RuntimeError(
                "Adahessian needs the graph of the gradients to compute Hessian-vector products: "
                "call loss.backward(create_graph=True)"
            )
        steps = [int(v.state["step"]) + 1 for v in views]  # the step about to be taken
        est: list[Tensor] = [torch.zeros_like(v.data) for v in views]  # grads without graph: D = 0
        for s in range(n):
            zs = [rademacher(grads[i], _mix_seed(seed, steps[i], positions[i], s)) for i in live]
            with torch.enable_grad():
                hzs = torch.autograd.grad(
                    [grads[i] for i in live],
                    [params[i] for i in live],
                    grad_outputs=zs,
                    retain_graph=s < n - 1,
                    allow_unused=True,
                )
            prods = [torch.zeros_like(z) if hz is None else hz.detach() * z for hz, z in zip(hzs, zs)]
            if n > 1:
                torch._foreach_div_(prods, float(n))
            # (a 0-dim parameter's local data is a 1-element view: match its shape)
            torch._foreach_add_(
                [est[i] for i in live], [p.to(est[i].dtype).reshape(est[i].shape) for p, i in zip(prods, live)]
            )
        return est

    def _step_groups(self, groups: list[tuple[dict[str, Any], list[ParamView]]], ctx: StepContext) -> None:
        if any(v.sharded for _, vs in groups for v in vs):
            raise NotImplementedError(
                "Adahessian's Hessian-vector products are a model-level computation (autograd through "
                "the whole model graph); they cannot be computed from dim-0 parameter shards. Train "
                "Adahessian unsharded (DDP), or use a first-order optimizer under ZeRO/FSDP2."
            )
        position = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        due: list[tuple[dict[str, Any], ParamView]] = []
        for group, views in groups:
            for v in views:
                if not v.state.keys() - WRAPPER_STATE_KEYS:
                    self._init_state(group, v)
                t = int(v.state["step"])  # steps taken so far
                if t % group["update_each"] == 0 or "hess" not in v.state:
                    due.append((group, v))
        hess: dict[int, Tensor] = {}
        if due:
            est = self._hutchinson([v for _, v in due], [position[id(v.param)] for _, v in due])
            for (group, v), h in zip(due, est):
                if group["avg_conv_kernel"] and len(v.shape) == 4:
                    h = h.abs().mean(dim=[2, 3], keepdim=True).expand_as(h).clone()
                if group["update_each"] > 1:
                    v.state["hess"] = h
                hess[id(v.param)] = h
        ctx.extra["hess"] = hess
        for group, views in groups:
            self._update(group, views, ctx)

    # ------------------------------------------------------------------ update
    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        if not views:
            return
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        fresh = ctx.extra["hess"]
        hess = [fresh[id(v.param)] if id(v.param) in fresh else v.state["hess"] for v in views]
        wd = group["weight_decay"]
        scalars = [
            {"decay": 1.0 - lr * wd, "beta1": beta1, "beta2": beta2, "bc2": 1.0 - beta2**t,
             "eps": group["eps"], "size": -lr / (1.0 - beta1**t)}
            for t in F.advance_steps(views)
        ]  # fmt: skip
        # the estimate enters the rule as a read-only input beside the state (same tensors:
        # the rule's results land in the real state), the gradient without its graph
        views = [
            dataclasses.replace(v, grad=v.grad.detach(), state={**v.state, "hess": h})
            for v, h in zip(views, hess)
        ]
        K.apply(self, adahessian_rule, views, ("exp_avg", "exp_hessian_diag_sq", "hess"), scalars,
                decay=wd != 0.0, half_power=group["hessian_power"] / 2.0)  # fmt: skip


def adahessian_rule(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    s: dict[str, Tensor],
    *,
    decay: bool,
    half_power: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Adahessian's update of one tensor from its Hessian diagonal estimate ``st["hess"]`` (see
    :class:`Adahessian`; ``s["size"]`` is ``-lr / (1 - beta1^t)``)."""
    if decay:
        p = p * s["decay"]
    m = torch.lerp(st["exp_avg"], g, 1.0 - s["beta1"])
    v = K.ema_sq(st["exp_hessian_diag_sq"], st["hess"], s["beta2"])
    denom = torch.pow(v / s["bc2"], half_power) + s["eps"]
    return p + (s["size"] * m) / denom, {"exp_avg": m, "exp_hessian_diag_sq": v}
