"""Independent references the optimizer tests compare against.

``ref_*`` classes are deliberately plain: one parameter at a time, straight from the published
update rule, no multi-tensor kernels, no shared pieces with distopt.  ``load_timm_optim`` and
``load_transformers_optim`` give the peer libraries where installed (tests skip otherwise).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import torch
from torch.optim import Optimizer


def load_timm_optim(module: str):
    """Import ``timm.optim.<module>`` without importing timm's models (which need torchvision).

    Returns None when timm is not installed.
    """
    if "timm.optim" not in sys.modules:
        spec = importlib.util.find_spec("timm") if "timm" not in sys.modules else sys.modules["timm"].__spec__
        if spec is None or not spec.submodule_search_locations:
            return None
        locations = list(spec.submodule_search_locations)
        if "timm" not in sys.modules:
            pkg = types.ModuleType("timm")
            pkg.__path__ = locations
            pkg.__spec__ = spec
            sys.modules["timm"] = pkg
        sub = types.ModuleType("timm.optim")
        sub.__path__ = [p + "/optim" for p in locations]
        sys.modules["timm.optim"] = sub
    try:
        return importlib.import_module(f"timm.optim.{module}")
    except ImportError:
        return None


def load_transformers_optim():
    """``transformers.optimization`` or None when transformers is not installed."""
    try:
        return importlib.import_module("transformers.optimization")
    except ImportError:
        return None


class RefOptimizer(Optimizer):
    """A per-parameter reference: subclasses implement ``update(p, g, state, group)``."""

    @torch.no_grad()
    def step(self, closure=None):
        self.pre_step()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.update(p, p.grad.clone(), self.state[p], group)
        return None

    def pre_step(self):
        pass


class RefAdamW(RefOptimizer):
    """AdamW, Loshchilov & Hutter (2019), Algorithm 2 with torch's eps placement."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        if not st:
            st["t"] = 0
            st["m"] = torch.zeros_like(p)
            st["v"] = torch.zeros_like(p)
            st["vmax"] = torch.zeros_like(p)
        st["t"] += 1
        t = st["t"]
        p.mul_(1 - grp["lr"] * grp["weight_decay"])
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        v = st["v"]
        if grp["amsgrad"]:
            st["vmax"] = torch.maximum(st["vmax"], v)
            v = st["vmax"]
        mhat = st["m"] / (1 - b1**t)
        vhat = v / (1 - b2**t)
        p.sub_(grp["lr"] * mhat / (vhat.sqrt() + grp["eps"]))


class RefLamb(RefOptimizer):
    """LAMB, You et al. (2020), Algorithm 2, with a global gradient-norm pre-clip."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 max_grad_norm=1.0, trust_clip=False, always_adapt=False, grad_averaging=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                                      always_adapt=always_adapt, grad_averaging=grad_averaging))

    def pre_step(self):
        self.clip = 1.0
        mgn = self.defaults["max_grad_norm"]
        if mgn is None:
            return
        total = 0.0
        for grp in self.param_groups:
            for p in grp["params"]:
                if p.grad is not None:
                    total += float((p.grad.double() ** 2).sum())
        self.clip = max(1.0, math.sqrt(total) / mgn)

    def update(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        g = g / self.clip
        if not st:
            st["t"] = 0
            st["m"] = torch.zeros_like(p)
            st["v"] = torch.zeros_like(p)
        st["t"] += 1
        t = st["t"]
        b3 = (1 - b1) if grp["grad_averaging"] else 1.0
        st["m"] = b1 * st["m"] + b3 * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        r = (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + grp["eps"])
        u = r + grp["weight_decay"] * p
        if grp["weight_decay"] != 0 or grp["always_adapt"]:
            wn, un = float(p.norm()), float(u.norm())
            ratio = wn / un if wn > 0 and un > 0 else 1.0
            if grp["trust_clip"]:
                ratio = min(ratio, 1.0)
            u = u * ratio
        p.sub_(grp["lr"] * u)
