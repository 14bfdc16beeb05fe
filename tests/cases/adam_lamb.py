"""Cases: AdamW and Lamb (the templates of the element-wise and shape-aware families)."""

from __future__ import annotations

import distopt.optim as do
from tests.optim_cases import OptimCase
from tests.references import RefAdamW, RefLamb, load_timm_optim


def _timm(module, cls, **kw):
    def make(params):
        mod = load_timm_optim(module)
        return None if mod is None else getattr(mod, cls)(params, **kw)

    return make


CASES = [
    OptimCase(
        "adamw",
        make=lambda p: do.AdamW(p, lr=1e-2, weight_decay=0.05),
        reference=lambda p: RefAdamW(p, lr=1e-2, weight_decay=0.05),
        rosen_lr=5e-2,
        family="adam",
    ),
    OptimCase(
        "adamw-amsgrad",
        make=lambda p: do.AdamW(p, lr=1e-2, weight_decay=0.05, amsgrad=True),
        reference=lambda p: RefAdamW(p, lr=1e-2, weight_decay=0.05, amsgrad=True),
        rosen_lr=5e-2,
        family="adam",
    ),
    OptimCase(
        "lamb",
        make=lambda p: do.Lamb(p, lr=1e-2, weight_decay=0.05, max_grad_norm=1.0),
        reference=lambda p: RefLamb(p, lr=1e-2, weight_decay=0.05, max_grad_norm=1.0),
        peer=_timm("lamb", "Lamb", lr=1e-2, weight_decay=0.05, max_grad_norm=1.0),
        rosen_lr=2e-2,
        shape_aware=True,
        family="lamb",
    ),
    OptimCase(
        "lambc-adapt",
        make=lambda p: do.Lamb(p, lr=1e-2, weight_decay=0.0, max_grad_norm=None, trust_clip=True, always_adapt=True),
        reference=lambda p: RefLamb(p, lr=1e-2, weight_decay=0.0, max_grad_norm=None, trust_clip=True, always_adapt=True),
        peer=_timm("lamb", "Lamb", lr=1e-2, weight_decay=0.0, max_grad_norm=None, trust_clip=True, always_adapt=True),
        rosen_lr=2e-2,
        shape_aware=True,
        family="lamb",
    ),
]
