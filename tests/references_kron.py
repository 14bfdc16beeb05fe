"""An independent reference of PSGD Kron (Xi-Lin Li's Kronecker-factored PSGD, as timm publishes
its defaults), written with *dense* Kronecker products on ``vec(G)``: ``Q = kron(Q_1, ..., Q_n)``
as one matrix, the probe term through ``inv(Q)^T``, the factor statistics from explicit mode
unfoldings.  Small tensors only (the dense matrix is ``numel x numel``).  Random draws: one CPU
``torch.Generator`` seeded with ``seed``; per parameter and step a uniform for the balancing,
a probe seed when the preconditioner is updated, a uniform for the stochastic decay.
"""

from __future__ import annotations

import math

import torch

from tests.references import RefOptimizer

TINY = torch.finfo(torch.bfloat16).tiny


def _prob(step: int) -> torch.Tensor:
    n = torch.tensor(step, dtype=torch.float32)
    return (1.0 * torch.exp(-0.001 * (n - 500))).clamp(0.03, 1.0)


def _dense(factors):
    m = torch.ones(1, 1, dtype=factors[0].dtype)
    for q in factors:
        m = torch.kron(m, q if q.dim() == 2 else torch.diag(q))
    return m


def _unfold(t, k):
    return t.movedim(k, 0).reshape(t.shape[k], -1)


def _lower_bound(a):
    """Li's cheap spectral-norm lower bound: one power step from the largest row/column."""
    m = float(a.abs().max())
    if m == 0:
        return torch.tensor(0.0)
    s = a / m
    cols, rows = (s * s).sum(0), (s * s).sum(1)
    if cols.max() > rows.max():
        x = s[:, int(cols.argmax())] @ s
        return m * torch.linalg.vector_norm((x / x.norm()) @ s.T)
    x = s @ s[int(rows.argmax())]
    return m * torch.linalg.vector_norm(s.T @ (x / x.norm()))


class RefKron(RefOptimizer):
    """Kron with timm's defaults; options: weight_decay (L2 or decoupled), stochastic decay,
    flatten (dims 2..), memory_save_mode 'all_diag', a fixed update probability."""

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0.9,
        weight_decay=0.0,
        decoupled_decay=False,
        stochastic_weight_decay=False,
        preconditioner_update_probability=None,
        flatten=False,
        memory_save_mode=None,
        precond_lr=0.1,
        seed=1337,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                decoupled_decay=decoupled_decay,
                flatten=flatten,
                stochastic_weight_decay=stochastic_weight_decay,
                prob=preconditioner_update_probability,
                all_diag=memory_save_mode == "all_diag",
                precond_lr=precond_lr,
            ),
        )
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, p, g, st, grp):
        shape = p.shape if p.dim() else torch.Size([1])
        if grp["flatten"] and len(shape) > 2:
            shape = torch.Size([*shape[:2], math.prod(shape[2:])])
        g = g.reshape(shape)
        if not st:
            st["t"], st["counter"], st["m"] = 0, 0, torch.zeros(shape)
            s = 1.0 ** (1 / len(shape))
            st["Q"] = [
                torch.full((d,), s)
                if d == 1 or len(shape) < 2 or grp["all_diag"]
                else s * torch.eye(d)
                for d in shape
            ]
        prob = _prob(st["t"]) if grp["prob"] is None else grp["prob"]
        st["counter"] += 1
        update = bool(st["counter"] >= 1 / prob)
        if update:
            st["counter"] = 0
        st["t"] += 1
        b = grp["momentum"]
        st["m"] = st["m"] * b + g * (1 - b)
        m = st["m"] / (1 - b ** st["t"])
        Q = st["Q"]
        u = float(torch.rand((), generator=self.gen, dtype=torch.float64))
        if u < 0.01 and update and len(shape) > 1:
            norms = [q.abs().max() for q in Q]
            mean = torch.stack(norms).prod() ** (1 / len(Q))
            Q = st["Q"] = [q * (mean / n) for q, n in zip(Q, norms)]
        if update:
            seed = int(torch.randint(0, 2**31, (), generator=self.gen))
            v = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            dense = _dense(Q)
            a = (dense @ m.reshape(-1)).reshape(shape)
            bb = (torch.linalg.inv(dense).T @ v.reshape(-1)).reshape(shape)
            new = []
            for k, q in enumerate(Q):
                ua, ub = _unfold(a, k), _unfold(bb, k)
                if q.dim() == 1:
                    t1, t2 = (ua * ua).sum(1), (ub * ub).sum(1)
                    new.append(
                        q - grp["precond_lr"] * (t1 - t2) * q / ((t1 + t2).abs().max() + TINY)
                    )
                else:
                    t1, t2 = ua @ ua.T, ub @ ub.T
                    step = torch.triu(grp["precond_lr"] * (t1 - t2)) / (
                        _lower_bound(t1 + t2) + TINY
                    )
                    new.append(q - step @ q)
            Q = st["Q"] = new
        dense = _dense(Q)
        pre = (dense.T @ (dense @ m.reshape(-1))).reshape(shape)
        pre = pre * min(1.0, 1.1 / (float(pre.pow(2).mean().sqrt()) + 1e-8))
        wd = grp["weight_decay"]
        if wd and grp["stochastic_weight_decay"]:
            wd = 2 * float(torch.rand((), generator=self.gen, dtype=torch.float64)) * wd
        flat = p.detach().reshape(shape)
        if wd and grp["decoupled_decay"]:
            flat = flat * (1 - grp["lr"] * wd)
        elif wd:
            pre = pre + wd * flat
        p.copy_((flat - grp["lr"] * pre).reshape(p.shape))
