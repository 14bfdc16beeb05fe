"""Cases: timm 1.0's element-wise optimizers (Lion, NAdamW, ADOPT) and their cautious variants.

Each class is one distopt class whose ``c``/``w`` forms are options; the cautious cases are
shape-aware (the mask's mean is over the whole tensor: one batched reduction).
"""

from __future__ import annotations

import distopt.optim as do
from tests import references_timm1 as R
from tests.optim_cases import OptimCase
from tests.references import load_timm_optim


def _peer(module, cls, **kw):
    def make(params):
        mod = load_timm_optim(module)
        extra = {} if cls == "Mars" else {"foreach": False}
        return None if mod is None else getattr(mod, cls)(params, **extra, **kw)

    return make


def _case(id, cls, ref, module, peer_cls, opts=None, **kw):
    opts = dict(opts or {})
    return OptimCase(
        id,
        make=lambda p: cls(p, **kw),
        reference=lambda p: ref(p, **kw),
        peer=_peer(module, peer_cls, **kw),
        shape_aware=bool(kw.get("caution")) or cls is do.Mars,
        family=id.split("-")[0],
        **opts,
    )


CASES = [
    _case(
        "lion",
        do.Lion,
        R.RefLion,
        "lion",
        "Lion",
        {"rosen_lr": 1e-3, "rosen_tol": 0.7},
        lr=2e-3,
        weight_decay=0.1,
    ),
    _case(
        "clion-corrected",
        do.Lion,
        R.RefLion,
        "lion",
        "Lion",
        {"rosen_lr": 1e-3, "rosen_tol": 0.7},
        lr=2e-3,
        weight_decay=0.1,
        caution=True,
        corrected_weight_decay=True,
    ),  # fmt: skip
    _case(
        "nadamw",
        do.NAdamW,
        R.RefNAdamW,
        "nadamw",
        "NAdamW",
        {"rosen_lr": 3e-2},
        lr=1e-2,
        weight_decay=0.05,
    ),
    _case(
        "cnadamw",
        do.NAdamW,
        R.RefNAdamW,
        "nadamw",
        "NAdamW",
        {"rosen_lr": 3e-2},
        lr=1e-2,
        weight_decay=0.05,
        caution=True,
    ),  # fmt: skip
    _case(
        "adopt",
        do.Adopt,
        R.RefAdopt,
        "adopt",
        "Adopt",
        {"rosen_lr": 1e-2},
        lr=1e-2,
        weight_decay=0.05,
    ),
    _case(
        "cadoptw",
        do.Adopt,
        R.RefAdopt,
        "adopt",
        "Adopt",
        {"rosen_lr": 1e-2, "extra": {"first_update_step": 1}},
        lr=1e-2,
        weight_decay=0.05,
        decoupled=True,
        caution=True,
    ),  # fmt: skip
    _case(
        "laprop",
        do.LaProp,
        R.RefLaProp,
        "laprop",
        "LaProp",
        {"rosen_lr": 1e-2},
        lr=1e-2,
        weight_decay=0.05,
    ),
    _case(
        "claprop",
        do.LaProp,
        R.RefLaProp,
        "laprop",
        "LaProp",
        {"rosen_lr": 1e-2},
        lr=1e-2,
        weight_decay=0.05,
        caution=True,
    ),  # fmt: skip
    _case(
        "sgdw",
        do.SGDW,
        R.RefSGDW,
        "sgdw",
        "SGDW",
        {"rosen_lr": 1e-3, "model_lr": 5e-2},
        lr=1e-2,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.05,
    ),  # fmt: skip
    _case(
        "csgdw",
        do.SGDW,
        R.RefSGDW,
        "sgdw",
        "SGDW",
        {"rosen_lr": 1e-3, "model_lr": 5e-2},
        lr=1e-2,
        momentum=0.9,
        weight_decay=0.05,
        caution=True,
    ),  # fmt: skip
    _case(
        "adan", do.Adan, R.RefAdan, "adan", "Adan", {"rosen_lr": 1e-2}, lr=1e-2, weight_decay=0.05
    ),
    _case(
        "cadanw",
        do.Adan,
        R.RefAdan,
        "adan",
        "Adan",
        {"rosen_lr": 1e-2},
        lr=1e-2,
        weight_decay=0.05,
        no_prox=True,
        caution=True,
    ),  # fmt: skip
    _case(
        "mars", do.Mars, R.RefMars, "mars", "Mars", {"rosen_lr": 1e-2}, lr=1e-2, weight_decay=0.05
    ),
    _case(
        "cmars-lion-1d",
        do.Mars,
        R.RefMars,
        "mars",
        "Mars",
        {"rosen_lr": 1e-3, "rosen_tol": 0.7},
        lr=1e-2,
        weight_decay=0.05,
        caution=True,
        mars_type="lion",
        optimize_1d=True,
    ),  # fmt: skip
]

# Cautious and option variants: the multi-process sharding tests run the first case of each
# class (and clion, one cautious reduction across processes); the simulator runs every case.
_SIM_ONLY = {"cnadamw", "cadoptw", "claprop", "csgdw", "cadanw", "cmars-lion-1d"}
for _c in CASES:
    if _c.id in _SIM_ONLY:
        _c.extra = {**_c.extra, "multiprocess": False}
