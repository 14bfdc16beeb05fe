"""Independent references of the schedule-free optimizers (Defazio et al., 2024, arXiv:2405.15682).

Written from the paper's Algorithm 1 in its three-sequence form, not from the reference code's
in-place rewrite: each parameter keeps ``z`` and the average ``x`` explicitly, and the parameter
is set to ``y = (1 - beta) z + beta x`` after every step (train mode) or to ``x`` (eval mode).
The averaging weights ``c_t = w_t / sum(w)``, ``w_t = t^r lr_max^p``, the warmup and RAdam's
rectification are those of facebookresearch/schedule_free's released optimizers (1.4).
"""

from __future__ import annotations

import math

import torch

from tests.references import RefOptimizer


class _RefScheduleFree(RefOptimizer):
    """Per-parameter loops; ``pre_step`` advances each group's counters (every step, as the
    released optimizers do, whether or not a parameter of the group has a gradient)."""

    def __init__(self, params, defaults):
        super().__init__(
            params, {**defaults, "t": 0, "lr_max": -1.0, "wsum": 0.0, "training": False}
        )

    def beta(self, grp):
        return grp["betas"][0]

    def lr_factor(self, grp, t):
        w = grp.get("warmup_steps", 0)
        return t / w if t <= w else 1.0

    def pre_step(self):
        for grp in self.param_groups:
            if not grp["training"]:
                raise RuntimeError("reference: step in eval mode")
            grp["t"] += 1
            t = grp["t"]
            grp["lr_t"] = grp["lr"] * self.lr_factor(grp, t)
            grp["lr_max"] = max(grp["lr_max"], grp["lr_t"])
            w = t ** grp["r"] * grp["lr_max"] ** grp["weight_lr_power"]
            grp["wsum"] += w
            grp["c"] = w / grp["wsum"] if grp["wsum"] > 0 else 0.0

    def direction(self, g, st, grp):  # pragma: no cover - per subclass
        raise NotImplementedError

    def update(self, p, g, st, grp):
        if not st:
            st["z"], st["x"] = p.detach().clone(), p.detach().clone()
            st["v"] = torch.zeros_like(p)
        u = self.direction(g, st, grp) + grp["weight_decay"] * p  # decay at y
        st["z"] = st["z"] - grp["lr_t"] * u
        st["x"] = (1 - grp["c"]) * st["x"] + grp["c"] * st["z"]
        b = self.beta(grp)
        p.copy_((1 - b) * st["z"] + b * st["x"])

    @torch.no_grad()
    def train(self):
        for grp in self.param_groups:
            for p in grp["params"]:
                st = self.state.get(p)
                if st and not grp["training"]:
                    b = self.beta(grp)
                    p.copy_((1 - b) * st["z"] + b * st["x"])
            grp["training"] = True

    @torch.no_grad()
    def eval(self):
        for grp in self.param_groups:
            for p in grp["params"]:
                st = self.state.get(p)
                if st and grp["training"]:
                    p.copy_(st["x"])
            grp["training"] = False


def _adam(g, st, grp, t):
    b2 = grp["betas"][1]
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    return g / ((st["v"] / (1 - b2**t)).sqrt() + grp["eps"])


class RefAdamWScheduleFree(_RefScheduleFree):
    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power))  # fmt: skip

    def direction(self, g, st, grp):
        return _adam(g, st, grp, grp["t"])


class RefSGDScheduleFree(_RefScheduleFree):
    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0):  # fmt: skip
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power))  # fmt: skip

    def beta(self, grp):
        return grp["momentum"]

    def direction(self, g, st, grp):
        return g


def _rho(beta2, t):
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf, rho_inf - 2 * t * beta2**t / (1 - beta2**t)


class RefRAdamScheduleFree(_RefScheduleFree):
    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, r=0.0,
                 weight_lr_power=2.0, silent_sgd_phase=True):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r,
                                      weight_lr_power=weight_lr_power, silent_sgd_phase=silent_sgd_phase))  # fmt: skip

    def lr_factor(self, grp, t):
        rho_inf, rho_t = _rho(grp["betas"][1], t)
        if rho_t <= 4:
            return 0.0 if grp["silent_sgd_phase"] else 1.0
        return math.sqrt(
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        )

    def direction(self, g, st, grp):
        t = grp["t"]
        if _rho(grp["betas"][1], t)[1] > 4:
            return _adam(g, st, grp, t)
        b2 = grp["betas"][1]
        st["v"] = b2 * st["v"] + (1 - b2) * g * g  # the second moment moves in the SGD phase too
        return g
