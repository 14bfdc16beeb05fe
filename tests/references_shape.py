"""Independent references of the shape-aware optimizers (Adafactor, AdamP, SGDP, LARS, NovoGrad).

Plain per-parameter loops written from the published algorithms (and the documented options
of the seed libraries), computed in float64 and copied back into the parameter, with no shared
pieces with distopt.  See ``tests/references.py`` for the base class and the peer loaders.
"""

from __future__ import annotations

import math

import torch

from tests.references import RefOptimizer


def _rms(t: torch.Tensor) -> float:
    return math.sqrt(float((t * t).mean())) if t.numel() else 0.0


class RefAdafactor(RefOptimizer):
    """Shazeer & Stern (2018), Algorithms 4/5 with update clipping (sec. 6), the relative step
    size and parameter scale (sec. 8), an optional first moment, and the seeds' options:

    * ``min_dim=None``: factor the last two dims of every >= 2-D tensor (transformers);
      an int: factor dims (0, 1) of > 2-D tensors whose two leading dims exceed it, else the
      last two dims when both exceed it (timm);
    * ``scale_external``: the parameter scale also multiplies an external lr (transformers);
    * ``caution``: mask the first moment where it disagrees in sign with the gradient.
    """

    def __init__(self, params, lr=None, eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8,
                 beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True,
                 warmup_init=False, min_dim=None, scale_external=True, caution=False):
        super().__init__(params, dict(lr=lr, eps1=eps1, eps2=eps2, d=clip_threshold, decay=decay_rate,
                                      beta1=beta1, wd=weight_decay, scale=scale_parameter,
                                      relative=relative_step, warmup=warmup_init, min_dim=min_dim,
                                      scale_external=scale_external, caution=caution))

    @staticmethod
    def dims(shape, min_dim):
        n = len(shape)
        if min_dim is None:
            return (n - 2, n - 1) if n >= 2 else None
        if n > 2 and shape[0] > min_dim and shape[1] > min_dim:
            return (0, 1)
        if n >= 2 and shape[-2] > min_dim and shape[-1] > min_dim:
            return (n - 2, n - 1)
        return None

    def update(self, p, g, st, grp):
        g = g.double()
        x = p.detach().double()
        dims = self.dims(tuple(p.shape), grp["min_dim"])
        if not st:
            st["t"] = 0
            st["m"] = torch.zeros_like(x)
            if dims is None:
                st["V"] = torch.zeros_like(x)
            else:
                a, b = dims
                st["R"] = torch.zeros_like(x).mean(dim=b)
                st["C"] = torch.zeros_like(x).mean(dim=a)
        st["t"] += 1
        t = st["t"]
        if grp["relative"]:
            rho = min(1e-6 * t if grp["warmup"] else 1e-2, 1.0 / math.sqrt(t))
            scaled = grp["scale"]
        else:
            rho = grp["lr"]
            scaled = grp["scale"] and grp["scale_external"]
        alpha = rho * max(grp["eps2"], _rms(x)) if scaled else rho
        beta2 = 1.0 - t ** grp["decay"]
        g2 = g * g + grp["eps1"]
        if dims is None:
            st["V"] = beta2 * st["V"] + (1 - beta2) * g2
            v_hat = st["V"]
        else:
            a, b = dims
            st["R"] = beta2 * st["R"] + (1 - beta2) * g2.mean(dim=b)
            st["C"] = beta2 * st["C"] + (1 - beta2) * g2.mean(dim=a)
            r = st["R"] / st["R"].mean(dim=a, keepdim=True)
            v_hat = r.unsqueeze(b) * st["C"].unsqueeze(a)
        u = g / v_hat.sqrt()
        u = alpha * u / max(1.0, _rms(u) / grp["d"])
        if grp["beta1"] is not None:
            st["m"] = grp["beta1"] * st["m"] + (1 - grp["beta1"]) * u
            u = st["m"]
            if grp["caution"]:
                mask = (u * g > 0).double()
                u = u * mask / max(float(mask.mean()), 1e-3)
        x = x - grp["wd"] * alpha * x - u
        p.copy_(x.to(p.dtype))


# --------------------------------------------------------------------------- AdamP / SGDP


def _ref_projection(w, g, u, delta, wd_ratio, eps, caution):
    """Heo et al. (2021), Algorithm 1 (and its cautious variant); returns (u, wd multiplier)."""
    for channel in (True, False):
        shape2 = (w.shape[0], -1) if channel else (1, -1)
        W, G = w.reshape(shape2), g.reshape(shape2)
        cos = (W * G).sum(1).abs() / (W.norm(dim=1).clamp_min(eps) * G.norm(dim=1).clamp_min(eps))
        if not bool((cos < delta / math.sqrt(W.shape[1])).all()):
            continue
        w_hat = W / (W.norm(dim=1, keepdim=True) + eps)

        def proj(x, w_hat=w_hat, shape2=shape2):
            X = x.reshape(shape2)
            return (X - w_hat * (w_hat * X).sum(1, keepdim=True)).reshape(w.shape)

        u = proj(u)
        if caution:
            tangential = proj(g)
            mask = (u * tangential > 0).double()
            u = proj(u * mask / max(float(mask.mean()), 1e-3))
        return u, wd_ratio
    if caution:
        mask = (u * g > 0).double()
        u = u * mask / max(float(mask.mean()), 1e-3)
    return u, 1.0


class RefAdamP(RefOptimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1,
                 wd_ratio=0.1, nesterov=False, caution=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                                      wd_ratio=wd_ratio, nesterov=nesterov, caution=caution))

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        g = g.double()
        x = p.detach().double()
        if not st:
            st["t"], st["m"], st["v"] = 0, torch.zeros_like(x), torch.zeros_like(x)
        st["t"] += 1
        t = st["t"]
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        denom = st["v"].sqrt() / math.sqrt(1 - b2**t) + grp["eps"]
        m = b1 * st["m"] + (1 - b1) * g if grp["nesterov"] else st["m"]
        u = m / denom
        ratio = 1.0
        if x.dim() > 1:
            u, ratio = _ref_projection(x, g, u, grp["delta"], grp["wd_ratio"], grp["eps"], grp["caution"])
        elif grp["caution"]:
            mask = (u * g > 0).double()
            u = u * mask / max(float(mask.mean()), 1e-3)
        x = x * (1 - grp["lr"] * grp["weight_decay"] * ratio) - grp["lr"] / (1 - b1**t) * u
        p.copy_(x.to(p.dtype))


class RefSGDP(RefOptimizer):
    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 eps=1e-8, delta=0.1, wd_ratio=0.1, caution=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov, eps=eps,
                                      delta=delta, wd_ratio=wd_ratio, caution=caution))

    def update(self, p, g, st, grp):
        mom = grp["momentum"]
        g = g.double()
        x = p.detach().double()
        if not st:
            st["b"] = torch.zeros_like(x)
        st["b"] = mom * st["b"] + (1 - grp["dampening"]) * g
        u = g + mom * st["b"] if grp["nesterov"] else st["b"]
        ratio = 1.0
        if x.dim() > 1:
            u, ratio = _ref_projection(x, g, u, grp["delta"], grp["wd_ratio"], grp["eps"], grp["caution"])
        elif grp["caution"]:
            mask = (u * g > 0).double()
            u = u * mask / max(float(mask.mean()), 1e-3)
        x = x * (1 - grp["lr"] * grp["weight_decay"] * ratio / (1 - mom)) - grp["lr"] * u
        p.copy_(x.to(p.dtype))


# --------------------------------------------------------------------------- LARS / NovoGrad


class RefLars(RefOptimizer):
    """You et al. (2017) layer-wise rate, LARC clipping (NVIDIA apex), torch-SGD momentum."""

    def __init__(self, params, lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                                      always_adapt=always_adapt))

    def update(self, p, g, st, grp):
        g = g.double()
        x = p.detach().double()
        wd, lr = grp["weight_decay"], grp["lr"]
        if wd != 0 or grp["always_adapt"]:
            wn, gn = float(x.norm()), float(g.norm())
            local = grp["trust_coeff"] * wn / (gn + wd * wn + grp["eps"]) if wn > 0 and gn > 0 else 1.0
            if grp["trust_clip"]:
                local = min(local / lr, 1.0)
            g = (g + wd * x) * local
        if grp["momentum"] != 0:
            if "b" not in st:
                st["b"] = g.clone()
            else:
                st["b"] = grp["momentum"] * st["b"] + (1 - grp["dampening"]) * g
            g = g + grp["momentum"] * st["b"] if grp["nesterov"] else st["b"]
        p.copy_((x - lr * g).to(p.dtype))


class RefNvNovoGrad(RefOptimizer):
    """Ginsburg et al. (2019): a per-layer second moment of ||g||^2 (initialised with the first
    one), weight decay added to the normalised gradient (or decoupled), optional AMSGrad."""

    def __init__(self, params, lr=1e-3, betas=(0.95, 0.98), eps=1e-8, weight_decay=0.0,
                 grad_averaging=False, amsgrad=False, decoupled_decay=False, corrected_weight_decay=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      grad_averaging=grad_averaging, amsgrad=amsgrad,
                                      decoupled_decay=decoupled_decay,
                                      corrected_weight_decay=corrected_weight_decay, max_lr=lr))

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        lr, wd = grp["lr"], grp["weight_decay"]
        g = g.double()
        x = p.detach().double()
        if not st:
            st["m"], st["v"], st["vmax"] = torch.zeros_like(x), 0.0, 0.0
        n = float((g * g).sum())
        st["v"] = n if st["v"] == 0 else b2 * st["v"] + (1 - b2) * n
        v = st["v"]
        if grp["amsgrad"]:
            st["vmax"] = max(st["vmax"], v)
            v = st["vmax"]
        u = g / (math.sqrt(v) + grp["eps"])
        if wd != 0:
            if grp["decoupled_decay"]:
                s = lr * lr / grp["max_lr"] if grp["corrected_weight_decay"] else lr
                x = x * (1 - s * wd)
            else:
                u = u + wd * x
        if grp["grad_averaging"]:
            u = (1 - b1) * u
        st["m"] = b1 * st["m"] + u
        p.copy_((x - lr * st["m"]).to(p.dtype))
