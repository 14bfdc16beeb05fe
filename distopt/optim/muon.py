"""Muon and AdaMuon: momentum orthogonalised by Newton-Schulz, exact and cheap when sharded."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from distopt.optim import _functional as F
from distopt.optim import _orthogonal as O
from distopt.optim._adam_like import adam_like_update_
from distopt.optim._core import DistOptimizer, ParamView, StepContext
from distopt.optim._hyper import KW_ONLY, HyperSpec, betas, flag, integer, lr, nonneg, option
from distopt.optim._whole import whole_map

__all__ = ["Muon"]

_logger = logging.getLogger(__name__)

_NS_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
}


def _check_coefficients(name: str, value: Any) -> Any:
    O.resolve_coefficients(value)
    return value


def _choice(what: str, allowed: tuple[str, ...]):
    def check(name: str, value: Any) -> Any:
        if value not in allowed:
            raise ValueError(
                f"Invalid {name}: {value!r} (choose from {', '.join(map(repr, allowed))})"
            )
        return value

    return check


def _no_capture(name: str, value: Any) -> Any:
    if value:
        raise ValueError("capturable=True (CUDA-graph capture) is not supported by distopt's Muon")
    return False


class Muon(DistOptimizer):
    r"""Muon (Jordan et al., 2024) and AdaMuon (Si et al., 2025), with an AdamW fallback.

    Parameters whose shape suits orthogonalisation (:func:`~distopt.optim._orthogonal.suitable_for_muon`:
    two non-unit leading dims, conv kernels seen as ``(out, in * k * k)``) take, per step::

        p <- p * (1 - lr * weight_decay)
        B <- momentum * B + (1 - momentum) * g
        U  = momentum * B + (1 - momentum) * g    if nesterov else B
        O  = NewtonSchulz(U)                       (ns_steps iterations, ns_coefficients, in ns_dtype)
        muon:     p <- p - lr * scale(shape) * O
        adamuon:  v <- beta2 * v + (1 - beta2) * O^2
                  A  = O / (sqrt(v / (1 - beta2^t)) + eps)         (no bias correction when RMS-normalised)
                  A <- A / (||A||_F + eps)                          (adjust_lr_fn="match_rms_adamw")
                  p <- p - lr * scale(shape) * A

    Every other parameter (vectors, scalars, depthwise kernels, extreme aspect ratios, groups
    with ``use_fallback=True`` or ``use_muon=False``) takes AdamW — NAdamW when ``nesterov`` —
    with ``lr * fallback_lr_scale``, ``betas``, ``eps`` and ``weight_decay``.

    Sharded (distopt ZeRO rows, FSDP2 ``Shard(0)``), each orthogonalised parameter has one owner
    rank, balanced by Newton-Schulz FLOPs; the owner gets the other ranks' rows of ``U``, runs
    the iteration once for all the matrices it owns (batched by shape) and sends the rows of
    ``O`` back (:mod:`distopt.optim._whole`).  AdaMuon's Frobenius norm is one batched
    reduction.  The result equals single-process training.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 0.02).
        weight_decay: decoupled weight decay (default 0).
        momentum: momentum of the orthogonalised parameters (default 0.95).
        nesterov: Nesterov momentum, and NAdamW for the fallback (default False).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_coefficients: a preset (``"original"``, ``"quintic"``, ``"polar_express"``,
            ``"polar_express_safer"``), one ``(a, b, c)`` or a list of them (default "quintic").
        eps: floor of the normalising norm, AdaMuon's denominator term and the fallback's eps
            (default 1e-7).
        safety_factor: multiplies the normalising norm (default 1.0).
        adjust_lr_fn: shape-dependent lr factor: ``"original"``, ``"match_rms_adamw"``,
            ``"rms_to_rms"`` (AdaMuon: ``"match_rms_adamw"``, ``"rms_to_rms"``, ``"rsqrt_in"``) or
            None (default "match_rms_adamw").
        conv_mode: ``"flatten"`` (``(out, in*k*k)``) or ``"batched"`` (one matrix per kernel
            position) for >= 3-D parameters (default "flatten").
        normalize_spatial: in batched mode, divide the step by sqrt(kernel positions) (default True).
        adamw_lr: deprecated, as in timm: sets ``fallback_lr_scale = adamw_lr / lr``.
        fallback_lr_scale: lr factor of the fallback parameters (default 1.0).
        betas: the fallback's betas; ``betas[1]`` is also AdaMuon's (default (0.9, 0.95)).
        algo: ``"muon"`` or ``"adamuon"`` (default "muon").
        scale_eps: muP damping, ``eps * sqrt(in / out)`` added to the norm (default False).
        capturable: accepted for timm's signature; only False (CUDA-graph capture is not supported).
        verbose: log how parameters are routed (default False).
        ns_dtype: dtype of the iteration, ``"bfloat16"`` as in timm and torch (default), or
            ``"float32"``/``"float64"`` (distopt option).
    """

    hypers = HyperSpec(
        lr(0.02),
        nonneg("weight_decay", 0.0),
        nonneg("momentum", 0.95, at_most=1.0),
        flag("nesterov", False),
        integer("ns_steps", 5, minimum=1),
        option("ns_coefficients", "quintic", "str | tuple | list", _check_coefficients),
        nonneg("eps", 1e-7),
        nonneg("safety_factor", 1.0),
        option("adjust_lr_fn", "match_rms_adamw", "str | None"),
        option("conv_mode", "flatten", "str", _choice("conv_mode", ("flatten", "batched"))),
        flag("normalize_spatial", True),
        nonneg("adamw_lr", None, optional=True),
        nonneg("fallback_lr_scale", 1.0),
        betas((0.9, 0.95)),
        option("algo", "muon", "str", _choice("algo", ("muon", "adamuon"))),
        flag("scale_eps", False),
        option("capturable", False, "bool", _no_capture),
        flag("verbose", False),
        KW_ONLY,
        option("ns_dtype", "bfloat16", "str", _choice("ns_dtype", tuple(_NS_DTYPES))),
    )

    def _configure(self, params: Any, hypers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        hypers = dict(hypers)
        (O.adamuon_lr_scale if hypers["algo"] == "adamuon" else O.muon_lr_scale)(
            (4, 4), hypers["adjust_lr_fn"]
        )
        adamw_lr = hypers.pop("adamw_lr")
        hypers.pop("capturable")
        if adamw_lr is not None:  # deprecated in timm: the fallback lr as a scale of lr
            if float(hypers["lr"]) == 0:
                raise ValueError(
                    "adamw_lr needs lr != 0 (it sets fallback_lr_scale = adamw_lr / lr)"
                )
            _logger.warning("adamw_lr is deprecated; use fallback_lr_scale=adamw_lr/lr")
            hypers["fallback_lr_scale"] = adamw_lr / float(hypers["lr"])
        return params, hypers

    # ------------------------------------------------------------------ routing
    @staticmethod
    def uses_muon(group: dict[str, Any], shape: torch.Size) -> bool:
        """Whether a parameter of global ``shape`` in ``group`` is orthogonalised."""
        if group.get("use_fallback", False):
            return False
        if "use_muon" in group:
            return bool(group["use_muon"])
        return O.suitable_for_muon(shape)

    def _init_state(self, group: dict[str, Any], view: ParamView) -> None:
        muon = self.uses_muon(group, view.shape)
        if group["verbose"]:
            fb = "NAdamW" if group["nesterov"] else "AdamW"
            _logger.info(
                "Muon routing: shape %s -> %s",
                "x".join(map(str, view.shape)),
                "Muon" if muon else fb,
            )
        if muon:
            view.state["momentum_buffer"] = self._zeros(view)
            if group["algo"] == "adamuon":
                view.state["step"] = self._step_tensor(view)
                view.state["exp_avg_sq"] = self._zeros(view)
        else:
            view.state["step"] = self._step_tensor(view)
            view.state["exp_avg"] = self._zeros(view)
            view.state["exp_avg_sq"] = self._zeros(view)

    # ------------------------------------------------------------------ the step
    def _update(self, group: dict[str, Any], views: list[ParamView], ctx: StepContext) -> None:
        muon_vs = [v for v in views if self.uses_muon(group, v.shape)]
        fallback = [v for v in views if not self.uses_muon(group, v.shape)]
        lr = float(group["lr"])
        if muon_vs:
            self._muon_update(group, muon_vs, ctx, lr)
        if fallback:
            beta1, beta2 = group["betas"]
            adam_like_update_(
                ctx, fallback, lr=lr * group["fallback_lr_scale"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
            )  # fmt: skip

    def _orthogonalise(
        self, group: dict[str, Any], ctx: StepContext, views: list[ParamView], updates: list[Tensor]
    ):
        conv_mode = group["conv_mode"]
        steps = group["ns_steps"]
        coeffs = O.resolve_coefficients(group["ns_coefficients"])
        dtype = _NS_DTYPES[group["ns_dtype"]]
        mshapes = [O.matrix_shape(v.shape, conv_mode) for v in views]

        def fn(whole: list[Tensor], idx: list[int]) -> list[Tensor]:
            # batch the matrices of one shape: one Newton-Schulz run per shape
            out: list[Tensor | None] = [None] * len(whole)
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for j, i in enumerate(idx):
                by_shape.setdefault(mshapes[i], []).append(j)
            for mshape, js in by_shape.items():
                mats = [O.to_matrix(whole[j], conv_mode) for j in js]
                # one matrix: a 2-D run (addmm, as timm and torch); several: one batched run
                x = (
                    mats[0]
                    if len(mats) == 1
                    else torch.cat([m if m.dim() == 3 else m.unsqueeze(0) for m in mats])
                )
                y = O.newton_schulz(x, steps, coeffs, eps=group["eps"], safety_factor=group["safety_factor"],
                                    dtype=dtype, scale_eps=group["scale_eps"])  # fmt: skip
                parts = [y] if len(mats) == 1 else y.split(mshape[0] if len(mshape) == 3 else 1)
                for j, part in zip(js, parts):
                    if len(mats) > 1 and len(mshape) == 2:
                        part = part[0]
                    out[j] = O.from_matrix(part, whole[j].shape, conv_mode)
            return out  # type: ignore[return-value]

        costs = [float(O.ns_flops(s, steps)) for s in mshapes]
        return whole_map(self, ctx, views, updates, fn, costs), mshapes

    def _muon_update(
        self, group: dict[str, Any], views: list[ParamView], ctx: StepContext, lr: float
    ) -> None:
        params = [v.data for v in views]
        grads = [v.grad for v in views]
        bufs = [v.state["momentum_buffer"] for v in views]
        momentum, wd = group["momentum"], group["weight_decay"]
        adamuon = group["algo"] == "adamuon"
        steps = F.advance_steps(views) if adamuon else []
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        ortho, mshapes = self._orthogonalise(group, ctx, views, list(updates))
        batched = group["conv_mode"] == "batched"
        scales = []
        for v, ms in zip(views, mshapes):
            if adamuon:
                s, rms_norm = O.adamuon_lr_scale(ms, group["adjust_lr_fn"])
            else:
                s, rms_norm = O.muon_lr_scale(ms, group["adjust_lr_fn"]), False
            if batched and len(v.shape) >= 3 and group["normalize_spatial"]:
                s *= math.prod(v.shape[2:]) ** -0.5
            scales.append(s)
        if adamuon:
            _, beta2 = group["betas"]
            eps = group["eps"]
            sqs = [v.state["exp_avg_sq"] for v in views]
            F.ema_sq_(sqs, ortho, beta2)
            if rms_norm:  # same for every parameter of the group (depends on adjust_lr_fn only)
                denom = torch._foreach_sqrt(sqs)
                torch._foreach_add_(denom, eps)
            else:  # sqrt(v / (1 - beta2^t)) + eps
                denom = torch._foreach_div(sqs, F.bias_correction(beta2, steps))
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
            ortho = torch._foreach_div(ortho, denom)
            if rms_norm:
                norms = _frobenius_norms(ctx, views, ortho)
                ortho = torch._foreach_div(ortho, [n + eps for n in norms])
        # p <- p - lr * scale * O, one multi-tensor add per distinct scale
        by_scale: dict[float, list[int]] = {}
        for i, s in enumerate(scales):
            by_scale.setdefault(s, []).append(i)
        for s, ids in by_scale.items():
            torch._foreach_add_([params[i] for i in ids], [ortho[i] for i in ids], alpha=-lr * s)


def _frobenius_norms(
    ctx: StepContext, views: list[ParamView], tensors: list[Tensor]
) -> list[Tensor]:
    """Frobenius norm of each whole tensor: the local norm when unsharded, else the square root
    of the summed local sums of squares (one batched reduction)."""
    norms = torch._foreach_norm(tensors, 2)
    if not any(v.sharded for v in views):
        return list(norms)
    (sumsq,) = ctx.reduce([[n.float() * n.float() for n in norms]], [v.sharded for v in views])
    return [s.sqrt() if v.sharded else n for s, n, v in zip(sumsq, norms, views)]
