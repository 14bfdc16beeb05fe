"""Cases: Big Vision's Adafactor and the cautious / corrected-decay options of AdamW, Lamb, RAdam.

AdafactorBigVision keeps its momentum in float32 here (``momentum_dtype``; timm's default is
bfloat16, whose rounding of a sharded sum's last bit can flip a bf16 ulp): parity at the bf16
default is in ``tests/test_timm_bv.py``.  ``min_dim_size_to_factor`` is small so that the shapes
of ``tests.problems`` are factored with dim 0 the largest dim (the row statistic replicated) and,
at 1, the 1x1 matrix with dim 0 the second largest (the column statistic replicated).
"""

from __future__ import annotations

import torch

import distopt.optim as do
from tests import references_bv as R
from tests.optim_cases import OptimCase
from tests.references import load_timm_optim


def _timm(module, cls, **kw):
    def make(params):
        mod = load_timm_optim(module)
        return None if mod is None else getattr(mod, cls)(params, **kw)

    return make


def _torch_radam(**kw):
    return lambda params: torch.optim.RAdam(params, **kw)


_BV = dict(lr=5e-2, min_dim_size_to_factor=2, weight_decay=0.01, momentum_dtype=torch.float32)
_CBVC = dict(lr=5e-2, min_dim_size_to_factor=1, weight_decay=0.05, momentum_dtype=torch.float32,
             clipping_threshold=1.0, decay_offset=2, unscaled_wd=True, caution=True,
             corrected_weight_decay=True)  # fmt: skip


def _ref_bv(kw):
    return {k: v for k, v in kw.items() if k != "momentum_dtype"}


CASES = [
    OptimCase(
        "adafactorbv",
        make=lambda p: do.AdafactorBigVision(p, **_BV),
        reference=lambda p: R.RefAdafactorBV(p, **_ref_bv(_BV)),
        peer=_timm("adafactor_bv", "AdafactorBigVision", **_BV),
        rosen_lr=1e-2,
        model_lr=1e-2,
        shape_aware=True,
        family="adafactorbv",
    ),
    OptimCase(
        "cadafactorbvc-clip-offset",
        make=lambda p: do.AdafactorBigVision(p, **_CBVC),
        reference=lambda p: R.RefAdafactorBV(p, **_ref_bv(_CBVC)),
        peer=_timm("adafactor_bv", "AdafactorBigVision", **_CBVC),
        rosen_lr=1e-2,
        model_lr=1e-2,
        shape_aware=True,
        family="adafactorbv",
    ),
]

_ADAMC = dict(lr=1e-2, weight_decay=0.05, caution=True, corrected_weight_decay=True)
_ADAMC_AMS = dict(lr=1e-2, weight_decay=0.05, amsgrad=True, corrected_weight_decay=True)
_CLAMB = dict(lr=1e-2, weight_decay=0.05, caution=True)
_CLAMBCD = dict(lr=1e-2, weight_decay=0.05, caution=True, decoupled_decay=True,
                corrected_weight_decay=True, trust_clip=True)  # fmt: skip

# AdamW / Lamb / RAdam options: the simulator proves every case at 2-4 ranks; the multi-process
# tests run the first case of each class (the cautious reduction across processes: clion).
CASES += [
    OptimCase(
        "cadamc",
        make=lambda p: do.AdamW(p, **_ADAMC),
        reference=lambda p: R.RefAdamWC(p, **_ADAMC),
        peer=_timm("adamw", "AdamWLegacy", foreach=False, **_ADAMC),
        rosen_lr=5e-2,
        shape_aware=True,
        family="adam",
        extra={"multiprocess": False},
    ),
    OptimCase(
        "adamc-amsgrad",
        make=lambda p: do.AdamW(p, **_ADAMC_AMS),
        reference=lambda p: R.RefAdamWC(p, **_ADAMC_AMS),
        peer=_timm("adamw", "AdamWLegacy", foreach=False, **_ADAMC_AMS),
        rosen_lr=5e-2,
        family="adam",
    ),
    OptimCase(
        "clamb",
        make=lambda p: do.Lamb(p, **_CLAMB),
        reference=lambda p: R.RefLambC(p, **_CLAMB),
        peer=_timm("lamb", "Lamb", foreach=False, **_CLAMB),
        rosen_lr=2e-2,
        shape_aware=True,
        family="lamb",
        extra={"multiprocess": False},
    ),
    OptimCase(
        "clambcd-trustclip",
        make=lambda p: do.Lamb(p, **_CLAMBCD),
        reference=lambda p: R.RefLambC(p, **_CLAMBCD),
        peer=_timm("lamb", "Lamb", foreach=False, **_CLAMBCD),
        rosen_lr=2e-2,
        shape_aware=True,
        family="lamb",
        extra={"multiprocess": False},
    ),
    OptimCase(
        "radamw",
        make=lambda p: do.RAdam(p, lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
        reference=lambda p: R.RefRAdamTorch(
            p, lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True
        ),
        peer=_torch_radam(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
        rosen_lr=3e-3,
        family="radam",
    ),
    OptimCase(
        "radam-l2",
        make=lambda p: do.RAdam(p, lr=1e-2, weight_decay=0.05, decoupled_weight_decay=False),
        reference=lambda p: R.RefRAdamTorch(p, lr=1e-2, weight_decay=0.05),
        peer=_torch_radam(lr=1e-2, weight_decay=0.05),
        rosen_lr=3e-3,
        family="radam",
    ),
]
