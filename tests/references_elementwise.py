"""Independent references of the element-wise optimizers (tests/cases/elementwise.py).

Written from the published algorithms (and, for the options a paper does not describe, from the
documented behaviour of the library that popularised them): one parameter at a time, plain
tensor arithmetic, no multi-tensor kernels and nothing shared with distopt.
"""

from __future__ import annotations

import math
import re

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



class RefNadam(RefOptimizer):
    """Nadam, Dozat (2016), with the warming momentum schedule mu_t = b1 (1 - 0.5 * 0.96^(t sd))."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, schedule_decay=4e-3):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      schedule_decay=schedule_decay))

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        sd = grp["schedule_decay"]
        if not st:
            st.update(t=0, prod=1.0, m=_zeros(p), v=_zeros(p))
        st["t"] += 1
        t = st["t"]
        g = g + grp["weight_decay"] * p

        def mu(k):
            return b1 * (1 - 0.5 * 0.96 ** (k * sd))

        st["prod"] *= mu(t)
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        g_hat = g / (1 - st["prod"])
        m_hat = st["m"] / (1 - st["prod"] * mu(t + 1))
        m_bar = (1 - mu(t)) * g_hat + mu(t + 1) * m_hat
        p.sub_(grp["lr"] * m_bar / ((st["v"] / (1 - b2**t)).sqrt() + grp["eps"]))


class RefRMSpropTF(RefOptimizer):
    """RMSprop (Hinton, lecture 6e; centered: Graves 2013) in TensorFlow's formulation."""

    def __init__(self, params, lr=1e-2, alpha=0.9, eps=1e-10, weight_decay=0.0, momentum=0.0, centered=False,
                 decoupled_decay=False, corrected_weight_decay=False, lr_in_momentum=True, caution=False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, decoupled_decay=decoupled_decay,
                                      corrected_weight_decay=corrected_weight_decay, max_lr=lr,
                                      lr_in_momentum=lr_in_momentum, caution=caution))

    def update(self, p, g, st, grp):
        lr, a, wd, mom = grp["lr"], grp["alpha"], grp["weight_decay"], grp["momentum"]
        if not st:
            st.update(ms=torch.ones_like(p), mg=_zeros(p), buf=_zeros(p))
        if grp["decoupled_decay"]:
            s = lr * lr / grp["max_lr"] if grp["corrected_weight_decay"] else lr
            p.mul_(1 - s * wd)
        else:
            g = g + wd * p
        st["ms"] = a * st["ms"] + (1 - a) * g * g
        if grp["centered"]:
            st["mg"] = a * st["mg"] + (1 - a) * g
            d = (st["ms"] - st["mg"] ** 2 + grp["eps"]).sqrt()
        else:
            d = (st["ms"] + grp["eps"]).sqrt()
        if mom == 0:
            p.sub_(lr * g / d)
            return
        if grp["lr_in_momentum"]:
            st["buf"] = mom * st["buf"] + lr * g / d
            u = st["buf"]
        else:
            st["buf"] = mom * st["buf"] + g / d
            u = lr * st["buf"]
        if grp["caution"]:  # Cautious Optimizers (Liang et al. 2024): keep sign-agreeing entries, rescale
            keep = (u * g > 0).to(u.dtype)
            u = u * keep / max(float(keep.mean()), 1e-3)
        p.sub_(u)


class RefMADGRAD(RefOptimizer):
    """MADGRAD, Defazio & Jelassi (2021), Algorithm 1 (lambda_k = (lr + eps) sqrt(k) as in the release)."""

    def __init__(self, params, lr=1e-2, momentum=0.9, weight_decay=0.0, eps=1e-6, decoupled_decay=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps,
                                      decoupled_decay=decoupled_decay))

    def update(self, p, g, st, grp):
        lr, eps, wd, mom = grp["lr"], grp["eps"], grp["weight_decay"], grp["momentum"]
        if not st:
            st.update(k=0, x0=p.clone(), s=_zeros(p), nu=_zeros(p))
        st["k"] += 1
        lam = (lr + eps) * math.sqrt(st["k"])
        if grp["decoupled_decay"]:
            p.mul_(1 - lr * wd)
        else:
            g = g + wd * p
        if mom == 0:  # without momentum the dual-averaging anchor is recovered from the current iterate
            st["x0"] = p + st["s"] / (st["nu"] ** (1 / 3) + eps)
        st["nu"] = st["nu"] + lam * g * g
        st["s"] = st["s"] + lam * g
        z = st["x0"] - st["s"] / (st["nu"] ** (1 / 3) + eps)
        p.copy_(mom * p + (1 - mom) * z)


class RefSGD(RefOptimizer):
    """SGD with momentum (Polyak) / Nesterov (Sutskever et al. 2013), as documented by torch.optim.SGD."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))

    def update(self, p, g, st, grp):
        mom = grp["momentum"]
        if grp["maximize"]:
            g = -g
        g = g + grp["weight_decay"] * p
        if mom != 0:
            st["b"] = g.clone() if "b" not in st else mom * st["b"] + (1 - grp["dampening"]) * g
            g = g + mom * st["b"] if grp["nesterov"] else st["b"]
        p.sub_(grp["lr"] * g)


class RefAdam(RefOptimizer):
    """Adam, Kingma & Ba (2015), Algorithm 1 with an L2 penalty in the gradient (and AMSGrad)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled_weight_decay=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, decoupled_weight_decay=decoupled_weight_decay))

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        if not st:
            st.update(t=0, m=_zeros(p), v=_zeros(p), vmax=_zeros(p))
        st["t"] += 1
        t = st["t"]
        if grp["maximize"]:
            g = -g
        if grp["decoupled_weight_decay"]:
            p.mul_(1 - grp["lr"] * grp["weight_decay"])
        else:
            g = g + grp["weight_decay"] * p
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        st["vmax"] = torch.maximum(st["vmax"], st["v"])
        v = st["vmax"] if grp["amsgrad"] else st["v"]
        p.sub_(grp["lr"] * (st["m"] / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + grp["eps"]))


class RefAdamax(RefOptimizer):
    """Adamax, Kingma & Ba (2015), Algorithm 2 (eps added to |g|, as torch documents)."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        if not st:
            st.update(t=0, m=_zeros(p), u=_zeros(p))
        st["t"] += 1
        if grp["maximize"]:
            g = -g
        g = g + grp["weight_decay"] * p
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["u"] = torch.maximum(b2 * st["u"], g.abs() + grp["eps"])
        p.sub_(grp["lr"] / (1 - b1 ** st["t"]) * st["m"] / st["u"])


class RefAdagrad(RefOptimizer):
    """Adagrad, Duchi et al. (2011), diagonal version with torch's lr_decay."""

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 maximize=False):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      maximize=maximize))

    def update(self, p, g, st, grp):
        if not st:
            st.update(t=0, s=torch.full_like(p, grp["initial_accumulator_value"]))
        st["t"] += 1
        if grp["maximize"]:
            g = -g
        g = g + grp["weight_decay"] * p
        st["s"] = st["s"] + g * g
        lr_t = grp["lr"] / (1 + (st["t"] - 1) * grp["lr_decay"])
        p.sub_(lr_t * g / (st["s"].sqrt() + grp["eps"]))


class RefAdadelta(RefOptimizer):
    """Adadelta, Zeiler (2012), Algorithm 1, with torch's lr scaling of the delta."""

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize))

    def update(self, p, g, st, grp):
        rho, eps = grp["rho"], grp["eps"]
        if not st:
            st.update(eg2=_zeros(p), edx2=_zeros(p))
        if grp["maximize"]:
            g = -g
        g = g + grp["weight_decay"] * p
        st["eg2"] = rho * st["eg2"] + (1 - rho) * g * g
        dx = (st["edx2"] + eps).sqrt() / (st["eg2"] + eps).sqrt() * g
        st["edx2"] = rho * st["edx2"] + (1 - rho) * dx * dx
        p.sub_(grp["lr"] * dx)


class RefRMSprop(RefOptimizer):
    """RMSprop (Hinton, lecture 6e; centered: Graves 2013), torch's formulation (eps outside the root)."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                 maximize=False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, maximize=maximize))

    def update(self, p, g, st, grp):
        a, mom = grp["alpha"], grp["momentum"]
        if not st:
            st.update(ms=_zeros(p), mg=_zeros(p), buf=_zeros(p))
        if grp["maximize"]:
            g = -g
        g = g + grp["weight_decay"] * p
        st["ms"] = a * st["ms"] + (1 - a) * g * g
        var = st["ms"]
        if grp["centered"]:
            st["mg"] = a * st["mg"] + (1 - a) * g
            var = var - st["mg"] ** 2
        d = var.sqrt() + grp["eps"]
        if mom > 0:
            st["buf"] = mom * st["buf"] + g / d
            p.sub_(grp["lr"] * st["buf"])
        else:
            p.sub_(grp["lr"] * g / d)


class RefAdamWeightDecay(RefOptimizer):
    """transformers' TF AdamWeightDecay: Keras Adam (Kingma & Ba's eps-hat form) after decaying
    selected weights by lr * rate; Keras clipvalue / clipnorm / global_clipnorm on the gradients.

    ``names`` maps ``id(tensor)`` to the name the include/exclude patterns are matched against.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-7, weight_decay=0.0, amsgrad=False,
                 include_in_weight_decay=None, exclude_from_weight_decay=None, clipnorm=None, clipvalue=None,
                 global_clipnorm=None, names=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      clipnorm=clipnorm, clipvalue=clipvalue))
        self.include = include_in_weight_decay or []
        self.exclude = exclude_from_weight_decay or []
        self.global_clipnorm = global_clipnorm
        self.names = names or {}

    def _decays(self, p, grp):
        if grp["weight_decay"] == 0:
            return False
        name = self.names.get(id(p))
        if any(re.search(r, name) for r in self.include):
            return True
        return not any(re.search(r, name) for r in self.exclude)

    def _value_clip(self, g, grp):
        cv = grp["clipvalue"]
        return g if cv is None else g.clamp(-cv, cv)

    def pre_step(self):
        self.scale = 1.0
        if self.global_clipnorm is None:
            return
        total = 0.0
        for grp in self.param_groups:
            for p in grp["params"]:
                if p.grad is not None:
                    total += float((self._value_clip(p.grad, grp).double() ** 2).sum())
        self.scale = self.global_clipnorm / max(math.sqrt(total), self.global_clipnorm)

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        lr = grp["lr"]
        g = self._value_clip(g, grp)
        if grp["clipnorm"] is not None:
            g = g * grp["clipnorm"] / max(float(g.norm()), grp["clipnorm"])
        g = g * self.scale
        if not st:
            st.update(t=0, m=_zeros(p), v=_zeros(p), vhat=_zeros(p))
        st["t"] += 1
        t = st["t"]
        if self._decays(p, grp):
            p.sub_(lr * grp["weight_decay"] * p)
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        st["vhat"] = torch.maximum(st["vhat"], st["v"])
        v = st["vhat"] if grp["amsgrad"] else st["v"]
        lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p.sub_(lr_t * st["m"] / (v.sqrt() + grp["eps"]))


class RefAdahessian(RefOptimizer):
    """AdaHessian, Yao et al. (2021), Algorithm 1: Hutchinson's diagonal, (optional) spatial averaging,
    Adam-like moments with the Hessian power k; decoupled weight decay.

    Draws its Rademacher vectors from its own generator, one parameter at a time.
    """

    def __init__(self, params, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, hessian_power=1.0,
                 update_each=1, n_samples=1, avg_conv_kernel=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      hessian_power=hessian_power, update_each=update_each, n_samples=n_samples,
                                      avg_conv_kernel=avg_conv_kernel))
        self.gen = torch.Generator().manual_seed(1234)

    @torch.no_grad()
    def step(self, closure=None):
        live = [(p, grp) for grp in self.param_groups for p in grp["params"] if p.grad is not None]
        for p, grp in live:
            st = self.state[p]
            if not st:
                st.update(t=0, m=_zeros(p), v=_zeros(p))
            if st["t"] % grp["update_each"] == 0:
                n = grp["n_samples"]
                d = _zeros(p)
                for _ in range(n):
                    z = torch.randint(0, 2, p.shape, generator=self.gen).to(p.dtype) * 2 - 1
                    (hz,) = torch.autograd.grad(p.grad, p, grad_outputs=z, retain_graph=True)
                    d = d + z * hz / n
                if grp["avg_conv_kernel"] and p.dim() == 4:
                    d = d.abs().mean(dim=(2, 3), keepdim=True).expand_as(d)
                st["d"] = d
        for p, grp in live:
            st = self.state[p]
            b1, b2 = grp["betas"]
            st["t"] += 1
            t = st["t"]
            p.mul_(1 - grp["lr"] * grp["weight_decay"])
            st["m"] = b1 * st["m"] + (1 - b1) * p.grad.detach()
            st["v"] = b2 * st["v"] + (1 - b2) * st["d"] ** 2
            denom = (st["v"] / (1 - b2**t)) ** (grp["hessian_power"] / 2) + grp["eps"]
            p.sub_(grp["lr"] * st["m"] / (1 - b1**t) / denom)
