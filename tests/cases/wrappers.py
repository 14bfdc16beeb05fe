"""Cases: optimizer wrappers (Lookahead around element-wise and shape-aware optimizers).

``k=3`` so that the 10-step reference comparison and the 4+4-step resume check both cross
synchronisations (the resume one with slow copies already in the saved state).
"""

from __future__ import annotations

import torch

import distopt.optim as do
from tests.optim_cases import OptimCase
from tests.references import RefAdamW, RefLamb, load_timm_optim
from tests.references_wrappers import RefLookahead, RefSGD

K = 3


def _timm_lookahead_a(alpha, make_base):
    def make(params):
        mod = load_timm_optim("lookahead")
        base = make_base(params)
        return None if mod is None or base is None else mod.Lookahead(base, alpha=alpha, k=K)

    return make


def _timm_lookahead(make_base):
    return _timm_lookahead_a(0.5, make_base)


def _timm_lamb(params, **kw):
    mod = load_timm_optim("lamb")
    return None if mod is None else mod.Lamb(params, **kw)


CASES = [
    OptimCase(
        "lookahead_adamw",
        make=lambda p: do.Lookahead(do.AdamW(p, lr=1e-2, weight_decay=0.05), alpha=0.5, k=K),
        reference=lambda p: RefLookahead(RefAdamW(p, lr=1e-2, weight_decay=0.05), alpha=0.5, k=K),
        peer=_timm_lookahead(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05)),
        rosen_lr=5e-2,
        rosen_steps=2000,
        family="lookahead",
    ),
    OptimCase(
        "lookahead_lamb",
        make=lambda p: do.Lookahead(do.Lamb(p, lr=1e-2, weight_decay=0.05), alpha=0.8, k=K),
        reference=lambda p: RefLookahead(RefLamb(p, lr=1e-2, weight_decay=0.05), alpha=0.8, k=K),
        peer=_timm_lookahead_a(0.8, lambda p: _timm_lamb(p, lr=1e-2, weight_decay=0.05)),
        rosen_lr=2e-2,
        rosen_steps=2000,
        shape_aware=True,
        family="lookahead",
    ),
]

if hasattr(do, "SGD"):  # the element-wise SGD lands separately; pick it up when it does
    CASES.append(
        OptimCase(
            "lookahead_sgd_nesterov",
            make=lambda p: do.Lookahead(
                do.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3), k=K
            ),
            reference=lambda p: RefLookahead(
                RefSGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3), k=K
            ),
            peer=_timm_lookahead(
                lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3)
            ),
            rosen_lr=1e-3,
            rosen_steps=3000,
            model_lr=0.1,
            family="lookahead",
        )
    )
