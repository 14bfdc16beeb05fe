"""Independent references for the wrapper cases (``tests/cases/wrappers.py``).

Plain per-parameter code written from the published algorithms, sharing nothing with distopt.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class RefLookahead:
    """Lookahead (Zhang et al., 2019, Algorithm 1) around any optimizer, one tensor at a time.

    Slow weights follow timm's convention: a parameter's slow copy is taken from the fast
    weights at the first synchronisation that sees it with a gradient.
    """

    def __init__(self, base, alpha=0.5, k=6):
        self.base = base
        self.alpha = alpha
        self.k = k
        self.count = 0
        self.slow = {}

    def zero_grad(self, set_to_none=True):
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.base.step(closure) if closure is not None else self.base.step()
        self.count += 1
        if self.count % self.k == 0:
            for group in self.base.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p not in self.slow:
                        self.slow[p] = p.detach().double().clone()
                    s = self.slow[p]
                    s += self.alpha * (p.detach().double() - s)
                    p.copy_(s)
        return loss

    @property
    def param_groups(self):
        return self.base.param_groups


class RefSGD(Optimizer):
    """SGD with (Nesterov) momentum and L2 weight decay (Sutskever et al., 2013 form)."""

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        for grp in self.param_groups:
            for p in grp["params"]:
                if p.grad is None:
                    continue
                d = p.grad + grp["weight_decay"] * p
                if grp["momentum"]:
                    st = self.state[p]
                    if "buf" not in st:
                        st["buf"] = d.clone()
                    else:
                        st["buf"] = grp["momentum"] * st["buf"] + d
                    d = d + grp["momentum"] * st["buf"] if grp["nesterov"] else st["buf"]
                p.sub_(grp["lr"] * d)
        return None
