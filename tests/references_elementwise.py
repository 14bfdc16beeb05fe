"""Independent references of the element-wise optimizers (tests/cases/elementwise.py).

Written from the published algorithms (and, for the options a paper does not describe, from the
documented behaviour of the library that popularised them): one parameter at a time, plain
tensor arithmetic, no multi-tensor kernels and nothing shared with distopt.
"""

from __future__ import annotations

import math

import torch

from tests.references import RefOptimizer


def _zeros(p):
    return torch.zeros_like(p)


def _rho(beta2: float, t: int) -> tuple[float, float]:
    """RAdam (Liu et al. 2020, eq. 5-6): SMA length rho_t and its limit rho_inf."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    return rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t), rho_inf


def _r(rho: float, rho_inf: float) -> float:
    """RAdam's variance rectification term r_t (Algorithm 2)."""
    return math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))


class RefAdaBelief(RefOptimizer):
    """AdaBelief, Zhuang et al. (2020), Algorithm 2, with the weight-decay and rectify options."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False,
                 decoupled_decay=True, fixed_decay=False, rectify=True, degenerated_to_sgd=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      decoupled_decay=decoupled_decay, fixed_decay=fixed_decay, rectify=rectify,
                                      degenerated_to_sgd=degenerated_to_sgd))

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        lr, eps, wd = grp["lr"], grp["eps"], grp["weight_decay"]
        if not st:
            st.update(t=0, m=_zeros(p), s=_zeros(p), smax=_zeros(p))
        st["t"] += 1
        t = st["t"]
        if grp["decoupled_decay"]:
            p.mul_(1 - (wd if grp["fixed_decay"] else lr * wd))
        else:
            g = g + wd * p
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["s"] = b2 * st["s"] + (1 - b2) * (g - st["m"]) ** 2 + eps
        st["smax"] = torch.maximum(st["smax"], st["s"])
        mhat = st["m"] / (1 - b1**t)
        if not grp["rectify"]:
            s = st["smax"] if grp["amsgrad"] else st["s"]
            p.sub_(lr * mhat / ((s / (1 - b2**t)).sqrt() + eps))
            return
        rho, rho_inf = _rho(b2, t)
        if rho >= 5:
            # the rectified step: bias correction of s folded into the step size, eps added to sqrt(s)
            p.sub_(lr * _r(rho, rho_inf) * math.sqrt(1 - b2**t) * mhat / (st["s"].sqrt() + eps))
        elif grp["degenerated_to_sgd"]:
            p.sub_(lr * mhat)


class RefRAdam(RefOptimizer):
    """RAdam, Liu et al. (2020), Algorithm 2, with decoupled weight decay scaled by lr."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        lr = grp["lr"]
        if not st:
            st.update(t=0, m=_zeros(p), v=_zeros(p))
        st["t"] += 1
        t = st["t"]
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        mhat = st["m"] / (1 - b1**t)
        p.mul_(1 - lr * grp["weight_decay"])
        rho, rho_inf = _rho(b2, t)
        if rho >= 5:
            p.sub_(lr * _r(rho, rho_inf) * math.sqrt(1 - b2**t) * mhat / (st["v"].sqrt() + grp["eps"]))
        else:
            p.sub_(lr * mhat)

