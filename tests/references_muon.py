"""Independent references of the Muon family (plain per-parameter loops from the published rules).

Muon: Jordan et al. (2024), https://kellerjordan.github.io/posts/muon/ — momentum, then the
quintic Newton-Schulz map ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` on ``X0 = M / ||M||_F``.
AdaMuon: Si et al. (2025), arXiv:2507.11005 — a second moment of the orthogonalised direction,
RMS-aligned rescaling (eq. 8).  The shape rules (which parameters are orthogonalised, the lr
factors) are the ones documented for the timm/torch implementations.  Written here from those
formulas with ordinary matmuls, in float32 (the distopt cases use ``ns_dtype="float32"``).
"""

from __future__ import annotations

import math

import torch

from tests.references import RefOptimizer

QUINTIC = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]


def _orthogonalise(m, coeffs, steps, eps):
    x = m.clone()
    flip = x.shape[0] > x.shape[1]
    if flip:
        x = x.t()
    x = x / max(float(torch.linalg.norm(x)), eps)
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        gram = x @ x.t()
        x = a * x + b * (gram @ x) + c * (gram @ (gram @ x))
    return x.t() if flip else x


def _orthogonalised(shape):
    s = list(shape)
    if len(s) < 2 or sum(d > 1 for d in s) < 2 or s[0] == 1 or s[1] == 1:
        return False
    rows, cols = s[0], math.prod(s[1:])
    return min(rows, cols) >= 4 and max(rows, cols) / min(rows, cols) <= 128


class RefMuon(RefOptimizer):
    """Muon / AdaMuon with the AdamW (NAdamW when nesterov) fallback, flatten mode."""

    def __init__(
        self,
        params,
        lr=0.02,
        weight_decay=0.0,
        momentum=0.95,
        nesterov=False,
        ns_steps=5,
        eps=1e-7,
        adjust_lr_fn="match_rms_adamw",
        fallback_lr_scale=1.0,
        betas=(0.9, 0.95),
        algo="muon",
        **_ignored,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                eps=eps,
                adjust_lr_fn=adjust_lr_fn,
                fallback_lr_scale=fallback_lr_scale,
                betas=betas,
                algo=algo,
            ),
        )

    def update(self, p, g, st, grp):
        if _orthogonalised(p.shape):
            self._muon(p, g, st, grp)
        else:
            self._adamw(p, g, st, grp)

    def _muon(self, p, g, st, grp):
        mu, lr = grp["momentum"], grp["lr"]
        if not st:
            st["B"], st["v"], st["t"] = torch.zeros_like(p), torch.zeros_like(p), 0
        st["t"] += 1
        p.mul_(1 - lr * grp["weight_decay"])
        st["B"] = mu * st["B"] + (1 - mu) * g
        u = mu * st["B"] + (1 - mu) * g if grp["nesterov"] else st["B"]
        mat = u.reshape(p.shape[0], -1)
        o = _orthogonalise(mat, QUINTIC, grp["ns_steps"], grp["eps"])
        out_ch, in_ch = mat.shape
        if grp["algo"] == "muon":
            scale = {
                "original": math.sqrt(max(1, out_ch / in_ch)),
                "match_rms_adamw": 0.2 * math.sqrt(max(out_ch, in_ch)),
                "rms_to_rms": math.sqrt(out_ch / in_ch),
                None: 1.0,
            }[grp["adjust_lr_fn"]]
            p.sub_(lr * scale * o.reshape(p.shape))
            return
        b2 = grp["betas"][1]
        o = o.reshape(p.shape)
        st["v"] = b2 * st["v"] + (1 - b2) * o * o
        if grp["adjust_lr_fn"] == "match_rms_adamw":  # eq. (8): 0.2 * sqrt(numel) * A / ||A||
            a = o / (st["v"].sqrt() + grp["eps"])
            a = a / (torch.linalg.norm(a) + grp["eps"])
            scale = 0.2 * math.sqrt(p.numel())
        else:
            a = o / ((st["v"] / (1 - b2 ** st["t"])).sqrt() + grp["eps"])
            scale = {"rms_to_rms": math.sqrt(out_ch / in_ch), "rsqrt_in": in_ch**-0.5, None: 1.0}[
                grp["adjust_lr_fn"]
            ]
        p.sub_(lr * scale * a)

    def _adamw(self, p, g, st, grp):
        b1, b2 = grp["betas"]
        lr = grp["lr"] * grp["fallback_lr_scale"]
        if not st:
            st["m"], st["v"], st["t"] = torch.zeros_like(p), torch.zeros_like(p), 0
        st["t"] += 1
        t = st["t"]
        p.mul_(1 - lr * grp["weight_decay"])
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        m = (
            b1 * st["m"] + (1 - b1) * g if grp["nesterov"] else st["m"]
        )  # NAdamW: the moment one step ahead
        p.sub_(lr * (m / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + grp["eps"]))
