"""Independent references for timm 1.0's remaining names (plain per-parameter loops).

Big Vision's Adafactor: Zhai et al. (2022), "Scaling Vision Transformers", section 3.4 and its
optax form (``scale_by_factored_rms`` with a capped, offset ``beta2`` schedule, update clipping
by RMS, a first moment, decoupled decay).  AdamW: Loshchilov & Hutter (2019), Algorithm 2.
LAMB: You et al. (2020), Algorithm 2 with a global gradient-norm pre-clip.  RAdam: Liu et al.
(2020), Algorithm 2 in torch's form (the adaptive step when rho_t > 5).  The cautious mask:
Liang et al. (2024), Algorithm 1.  The corrected decay ``lr^2 / max_lr``: arXiv:2506.02285.
"""

from __future__ import annotations

import math

import torch

from tests.references import RefOptimizer


def _cautious(u, g):
    mask = ((u * g) > 0).float()
    return u * mask / max(float(mask.mean()), 1e-3)


def _wd_factor(grp, unscaled=False):
    """How much of ``weight_decay`` one step applies: lr (or 1), times lr / max_lr when corrected."""
    base = 1.0 if unscaled else grp["lr"]
    return base * grp["lr"] / grp["max_lr"] if grp.get("corrected_weight_decay") else base


class RefAdafactorBV(RefOptimizer):
    def __init__(self, params, lr=1.0, min_dim_size_to_factor=16, decay_rate=0.8, decay_offset=0,
                 beta2_cap=0.999, momentum=0.9, eps=1e-30, weight_decay=0.0, clipping_threshold=None,
                 unscaled_wd=False, caution=False, corrected_weight_decay=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, min_dim=min_dim_size_to_factor, decay_rate=decay_rate,
                                      decay_offset=decay_offset, beta2_cap=beta2_cap, momentum=momentum,
                                      eps=eps, weight_decay=weight_decay, clip=clipping_threshold,
                                      unscaled_wd=unscaled_wd, caution=caution,
                                      corrected_weight_decay=corrected_weight_decay, max_lr=lr))  # fmt: skip

    @staticmethod
    def _dims(shape, min_dim):
        if len(shape) < 2:
            return None
        order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
        dc, dr = order[-2], order[-1]
        return (dc, dr) if shape[dc] >= min_dim else None

    def update(self, p, g, st, grp):
        if not st:
            st["t"] = 0
            st["m"] = torch.zeros_like(p)
        st["t"] += 1
        s = max(st["t"] - grp["decay_offset"], 1)
        beta2 = min(grp["beta2_cap"], 1.0 - s ** (-grp["decay_rate"]))
        g2 = g * g + grp["eps"]
        dims = self._dims(p.shape, grp["min_dim"])
        if dims is None:
            st["v"] = beta2 * st.get("v", torch.zeros_like(p)) + (1 - beta2) * g2
            v_hat = st["v"]
        else:
            dc, dr = dims
            st["r"] = beta2 * st.get("r", 0.0) + (1 - beta2) * g2.mean(dim=dr, keepdim=True)
            st["c"] = beta2 * st.get("c", 0.0) + (1 - beta2) * g2.mean(dim=dc, keepdim=True)
            v_hat = st["r"] * st["c"] / st["r"].mean(dim=dc, keepdim=True)
        u = g / v_hat.sqrt()
        if grp["clip"] is not None:
            rms = float(u.norm()) / math.sqrt(u.numel())
            u = u / max(1.0, rms / grp["clip"])
        if grp["momentum"] is not None:
            st["m"] = grp["momentum"] * st["m"] + (1 - grp["momentum"]) * u
            u = st["m"]
            if grp["caution"]:
                u = _cautious(u, g)
        if grp["weight_decay"]:
            p.mul_(1 - _wd_factor(grp, grp["unscaled_wd"]) * grp["weight_decay"])
        p.sub_(grp["lr"] * u)


class RefAdamWC(RefOptimizer):
    """AdamW with the cautious mask on the first moment and the corrected decay."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 caution=False, corrected_weight_decay=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      caution=caution, corrected_weight_decay=corrected_weight_decay,
                                      max_lr=lr))  # fmt: skip

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        if not st:
            st["t"], st["m"], st["v"], st["vmax"] = (
                0,
                torch.zeros_like(p),
                torch.zeros_like(p),
                torch.zeros_like(p),
            )
        st["t"] += 1
        t = st["t"]
        p.mul_(1 - _wd_factor(grp) * grp["weight_decay"])
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        v = st["v"]
        if grp["amsgrad"]:
            st["vmax"] = torch.maximum(st["vmax"], v)
            v = st["vmax"]
        m = _cautious(st["m"], g) if grp["caution"] else st["m"]
        p.sub_(grp["lr"] * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + grp["eps"]))


class RefLambC(RefOptimizer):
    """LAMB with the cautious mask on the adaptive direction (before the decay term) and the
    corrected decoupled decay."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0,
                 trust_clip=False, always_adapt=False, caution=False, decoupled_decay=False,
                 corrected_weight_decay=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm, trust_clip=trust_clip, always_adapt=always_adapt,
                                      caution=caution, decoupled_decay=decoupled_decay,
                                      corrected_weight_decay=corrected_weight_decay, max_lr=lr))  # fmt: skip

    def pre_step(self):
        total = sum(float((p.grad.double() ** 2).sum()) for grp in self.param_groups for p in grp["params"]
                    if p.grad is not None)  # fmt: skip
        mgn = self.defaults["max_grad_norm"]
        self.clip = 1.0 if mgn is None else max(1.0, math.sqrt(total) / mgn)

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        g = g / self.clip
        if not st:
            st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        st["t"] += 1
        t = st["t"]
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        u = (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + grp["eps"])
        if grp["caution"]:
            u = _cautious(u, g)
        wd = grp["weight_decay"]
        if wd:
            if grp["decoupled_decay"]:
                p.mul_(1 - _wd_factor(grp) * wd)
            else:
                u = u + wd * p
        if wd or grp["always_adapt"]:
            wn, un = float(p.norm()), float(u.norm())
            ratio = wn / un if wn > 0 and un > 0 else 1.0
            u = u * (min(ratio, 1.0) if grp["trust_clip"] else ratio)
        p.sub_(grp["lr"] * u)


class RefRAdamTorch(RefOptimizer):
    """RAdam as torch computes it: L2 decay, or decoupled with ``decoupled_weight_decay``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled=decoupled_weight_decay))  # fmt: skip

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        if not st:
            st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        st["t"] += 1
        t = st["t"]
        if grp["decoupled"]:
            p.mul_(1 - grp["lr"] * grp["weight_decay"])
        else:
            g = g + grp["weight_decay"] * p
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        m_hat = st["m"] / (1 - b1**t)
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho > 5:
            r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            v_hat = st["v"] / (1 - b2**t)
            p.sub_(grp["lr"] * r * m_hat / (v_hat.sqrt() + grp["eps"] / math.sqrt(1 - b2**t)))
        else:
            p.sub_(grp["lr"] * m_hat)
