"""Independent references of timm 1.0's element-wise optimizers (plain per-parameter loops).

Lion: Chen et al. (2023), Algorithm 2.  NAdamW: Dozat (2016) in the AdamW form of Table 1 of
arXiv:1910.05446.  ADOPT: Taniguchi et al. (2024), Algorithm 1 (with the clip of their
implementation notes).  The cautious mask: Liang et al. (2024), Algorithm 1.
"""

from __future__ import annotations

import torch

from tests.references import RefOptimizer


def _cautious(u, g):
    mask = ((u * g) > 0).float()
    return u * mask / max(float(mask.mean()), 1e-3)


def _decay_scale(grp):
    return grp["lr"] ** 2 / grp["max_lr"] if grp.get("corrected_weight_decay") else grp["lr"]


class RefLion(RefOptimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, caution=False,
                 corrected_weight_decay=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, caution=caution,
                                      corrected_weight_decay=corrected_weight_decay, max_lr=lr))  # fmt: skip

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        if not st:
            st["m"] = torch.zeros_like(p)
        p.mul_(1 - _decay_scale(grp) * grp["weight_decay"])
        c = torch.sign(b1 * st["m"] + (1 - b1) * g)
        if grp["caution"]:
            c = _cautious(c, g)
        p.sub_(grp["lr"] * c)
        st["m"] = b2 * st["m"] + (1 - b2) * g


class RefNAdamW(RefOptimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, caution=False,
                 corrected_weight_decay=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, caution=caution,
                                      corrected_weight_decay=corrected_weight_decay, max_lr=lr))  # fmt: skip

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        if not st:
            st["m"], st["v"], st["t"] = torch.zeros_like(p), torch.zeros_like(p), 0
        st["t"] += 1
        t = st["t"]
        p.mul_(1 - _decay_scale(grp) * grp["weight_decay"])
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        n = b1 * st["m"] + (1 - b1) * g
        if grp["caution"]:
            n = _cautious(n, g)
        p.sub_(grp["lr"] / (1 - b1**t) * n / ((st["v"] / (1 - b2**t)).sqrt() + grp["eps"]))


class RefAdopt(RefOptimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip_exp=0.333, weight_decay=0.0,
                 decoupled=False, corrected_weight_decay=False, caution=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip_exp=clip_exp, weight_decay=weight_decay,
                                      decoupled=decoupled, corrected_weight_decay=corrected_weight_decay,
                                      caution=caution, max_lr=lr))  # fmt: skip

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        wd = grp["weight_decay"]
        if not grp["decoupled"]:
            g = g + wd * p
        if not st:  # step 1: v_0 = g_0^2, no update
            st["m"], st["v"], st["t"] = torch.zeros_like(p), g * g, 1
            return
        st["t"] += 1
        if grp["decoupled"]:
            p.mul_(1 - _decay_scale(grp) * wd)
        n = g / torch.clamp(st["v"].sqrt(), min=grp["eps"])
        if grp["clip_exp"] is not None:
            c = (st["t"] - 1) ** grp["clip_exp"]
            n = n.clamp(-c, c)
        st["m"] = b1 * st["m"] + (1 - b1) * n
        m = _cautious(st["m"], g) if grp["caution"] else st["m"]
        p.sub_(grp["lr"] * m)
        st["v"] = b2 * st["v"] + (1 - b2) * g * g


class RefLaProp(RefOptimizer):
    """LaProp, Ziyin et al. (2020), Algorithm 1 with lr-weighted bias corrections."""

    def __init__(self, params, lr=4e-4, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0, caution=False,
                 corrected_weight_decay=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, caution=caution,
                                      corrected_weight_decay=corrected_weight_decay, max_lr=lr))  # fmt: skip

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        lr = grp["lr"]
        if not st:
            st["m"], st["v"], st["c1"], st["c2"] = (
                torch.zeros_like(p),
                torch.zeros_like(p),
                0.0,
                0.0,
            )
        st["c1"] = b1 * st["c1"] + (1 - b1) * lr
        st["c2"] = b2 * st["c2"] + (1 - b2)
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        st["m"] = b1 * st["m"] + (1 - b1) * lr * g / ((st["v"] / st["c2"]).sqrt() + grp["eps"])
        m = _cautious(st["m"], g) if grp["caution"] else st["m"]
        p.sub_(lr / st["c1"] * m)
        p.mul_(1 - _decay_scale(grp) * grp["weight_decay"])


class RefSGDW(RefOptimizer):
    """SGD with decoupled weight decay (Loshchilov & Hutter, 2019), torch's momentum form."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 caution=False, corrected_weight_decay=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, caution=caution,
                                      corrected_weight_decay=corrected_weight_decay, max_lr=lr))  # fmt: skip

    def update(self, p, g, st, grp):
        mu = grp["momentum"]
        p.mul_(1 - _decay_scale(grp) * grp["weight_decay"])
        d = g
        if mu:
            st["b"] = g.clone() if "b" not in st else mu * st["b"] + (1 - grp["dampening"]) * g
            d = g + mu * st["b"] if grp["nesterov"] else st["b"]
            if grp["caution"]:
                d = _cautious(d, g)
        p.sub_(grp["lr"] * d)


class RefAdan(RefOptimizer):
    """Adan, Xie et al. (2022), Algorithm 1 (with the bias corrections of their implementation)."""

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0, no_prox=False,
                 caution=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                                      caution=caution))  # fmt: skip

    def update(self, p, g, st, grp):
        b1, b2, b3 = grp["betas"]
        lr, wd = grp["lr"], grp["weight_decay"]
        if not st:
            st.update(
                m=torch.zeros_like(p),
                e=torch.zeros_like(p),
                v=torch.zeros_like(p),
                prev=g.clone(),
                t=0,
            )
        st["t"] += 1
        t = st["t"]
        d = g - st["prev"]
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["e"] = b2 * st["e"] + (1 - b2) * d
        st["v"] = b3 * st["v"] + (1 - b3) * (g + b2 * d) ** 2
        denom = st["v"].sqrt() / (1 - b3**t) ** 0.5 + grp["eps"]
        m = _cautious(st["m"], g) if grp["caution"] else st["m"]
        u = lr / (1 - b1**t) * m / denom + lr * b2 / (1 - b2**t) * st["e"] / denom
        if grp["no_prox"]:
            p.mul_(1 - lr * wd).sub_(u)
        else:
            p.sub_(u).div_(1 + lr * wd)
        st["prev"] = g.clone()


class RefMars(RefOptimizer):
    """MARS-AdamW / MARS-Lion, Yuan et al. (2024), Algorithm 1 (approximate form: c_t from the
    current and previous gradients, clipped to norm 1), AdamW for vectors."""

    def __init__(self, params, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, gamma=0.025,
                 mars_type="adamw", optimize_1d=False, lr_1d_factor=1.0, betas_1d=None, caution=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma,
                                      mars_type=mars_type, optimize_1d=optimize_1d, lr_1d_factor=lr_1d_factor,
                                      betas_1d=betas_1d or betas, caution=caution))  # fmt: skip

    def update(self, p, g, st, grp):
        if not st:
            st.update(m=torch.zeros_like(p), v=torch.zeros_like(p), prev=torch.zeros_like(p), t=0)
        st["t"] += 1
        t, wd = st["t"], grp["weight_decay"]
        if grp["optimize_1d"] or p.dim() >= 2:
            b1, b2 = grp["betas"]
            c = g if t == 1 else g + grp["gamma"] * b1 / (1 - b1) * (g - st["prev"])
            c = c / max(float(torch.linalg.norm(c)), 1.0)
            st["m"] = b1 * st["m"] + (1 - b1) * c
            m = _cautious(st["m"], g) if grp["caution"] else st["m"]
            if grp["mars_type"] == "adamw":
                st["v"] = b2 * st["v"] + (1 - b2) * c * c
                u = (m / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + grp["eps"])
            else:
                u = torch.sign(m)
            p.sub_(grp["lr"] * (u + wd * p))
        else:
            b1, b2 = grp["betas_1d"]
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            m = _cautious(st["m"], g) if grp["caution"] else st["m"]
            u = (m / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + grp["eps"])
            p.sub_(grp["lr"] * grp["lr_1d_factor"] * (u + wd * p))
        st["prev"] = g.clone()
