"""Cases: the shape-aware optimizers (Adafactor in both flavours, AdamP, SGDP, Lars, NvNovoGrad).

Settings are chosen so that every code path the shapes of ``tests.problems.make_params`` can
reach is exercised: Adafactor with factored and unfactored moments (timm's factoring with
``min_dim_size_to_factor=2`` picks dims (0, 1) for the 4-D kernel), AdamP/SGDP with ``delta``
large enough that channel and layer projections happen (``delta`` avoids 1.0: a 1x1 tensor
has |cos| == 1 exactly, a tie that rounding would break either way), Lars with and without
adaptation.
"""

from __future__ import annotations

import distopt.optim as do
from tests.optim_cases import OptimCase
from tests.references import load_timm_optim, load_transformers_optim
from tests.references_shape import (
    RefAdafactor,
    RefAdamP,
    RefLars,
    RefNvNovoGrad,
    RefSGDP,
)


def _timm(module, cls, **kw):
    def make(params):
        mod = load_timm_optim(module)
        return None if mod is None else getattr(mod, cls)(params, **kw)

    return make


def _hf(**kw):
    def make(params):
        mod = load_transformers_optim()
        return None if mod is None else mod.Adafactor(params, **kw)

    return make


_HF_EXT = dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.01)
_HF_SCALED = dict(lr=1e-2, relative_step=False, beta1=0.9, decay_rate=-0.5, clip_threshold=0.5)
_TIMM_EXT = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, min_dim_size_to_factor=2, caution=True)

CASES = [
    # ---------------------------------------------------------------- Adafactor (transformers)
    OptimCase(
        "adafactor",
        make=lambda p: do.Adafactor(p),
        reference=lambda p: RefAdafactor(p),
        peer=_hf(),
        rosen_steps=2500,  # relative step: 1e-2 * RMS(xy) per step walks the valley slowly
        shape_aware=True,
        family="adafactor",
    ),
    OptimCase(
        "adafactor-ext-beta1-wd",
        make=lambda p: do.Adafactor(p, **_HF_EXT),
        reference=lambda p: RefAdafactor(p, lr=1e-2, relative_step=False, scale_parameter=False,
                                         beta1=0.9, weight_decay=0.01),
        peer=_hf(**_HF_EXT),
        rosen_lr=2e-2,
        model_lr=2e-2,
        shape_aware=True,
        family="adafactor",
    ),
    OptimCase(
        "adafactor-ext-scaled-clip",
        make=lambda p: do.Adafactor(p, **_HF_SCALED),
        reference=lambda p: RefAdafactor(p, lr=1e-2, relative_step=False, beta1=0.9, decay_rate=-0.5,
                                         clip_threshold=0.5),
        peer=_hf(**_HF_SCALED),
        rosen_lr=5e-2,
        model_lr=5e-2,
        shape_aware=True,
        family="adafactor",
    ),
    # ---------------------------------------------------------------- Adafactor (timm)
    OptimCase(
        "adafactor-timm",
        make=lambda p: do.AdafactorTimm(p, min_dim_size_to_factor=2),
        reference=lambda p: RefAdafactor(p, min_dim=2, scale_external=False),
        peer=_timm("adafactor", "Adafactor", min_dim_size_to_factor=2),
        rosen_steps=2500,  # relative step, as above
        shape_aware=True,
        family="adafactor",
    ),
    OptimCase(
        "adafactor-timm-ext-caution",
        make=lambda p: do.AdafactorTimm(p, **_TIMM_EXT),
        reference=lambda p: RefAdafactor(p, lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.01,
                                         min_dim=2, scale_external=False, caution=True),
        peer=_timm("adafactor", "Adafactor", **_TIMM_EXT),
        rosen_lr=2e-2,
        model_lr=2e-2,
        shape_aware=True,
        family="adafactor",
    ),
    # ---------------------------------------------------------------- AdamP / SGDP
    OptimCase(
        "adamp",
        make=lambda p: do.AdamP(p, lr=1e-2, weight_decay=0.1),
        reference=lambda p: RefAdamP(p, lr=1e-2, weight_decay=0.1),
        peer=_timm("adamp", "AdamP", lr=1e-2, weight_decay=0.1),
        rosen_lr=5e-2,
        shape_aware=True,
        family="adamp",
    ),
    OptimCase(
        "adamp-project-nesterov",
        make=lambda p: do.AdamP(p, lr=1e-2, weight_decay=0.1, delta=1.5, nesterov=True),
        reference=lambda p: RefAdamP(p, lr=1e-2, weight_decay=0.1, delta=1.5, nesterov=True),
        peer=_timm("adamp", "AdamP", lr=1e-2, weight_decay=0.1, delta=1.5, nesterov=True),
        rosen_lr=5e-2,
        shape_aware=True,
        family="adamp",
    ),
    OptimCase(
        "adamp-caution",
        make=lambda p: do.AdamP(p, lr=1e-2, weight_decay=0.1, delta=0.5, caution=True),
        reference=lambda p: RefAdamP(p, lr=1e-2, weight_decay=0.1, delta=0.5, caution=True),
        peer=_timm("adamp", "AdamP", lr=1e-2, weight_decay=0.1, delta=0.5, caution=True),
        rosen_lr=5e-2,
        shape_aware=True,
        family="adamp",
    ),
    OptimCase(
        "sgdp",
        make=lambda p: do.SGDP(p, lr=1e-2, momentum=0.9, weight_decay=0.01, delta=1.5),
        reference=lambda p: RefSGDP(p, lr=1e-2, momentum=0.9, weight_decay=0.01, delta=1.5),
        peer=_timm("sgdp", "SGDP", lr=1e-2, momentum=0.9, weight_decay=0.01, delta=1.5),
        rosen_lr=1e-3,
        model_lr=0.05,
        shape_aware=True,
        family="sgdp",
    ),
    OptimCase(
        "sgdp-nesterov-caution",
        make=lambda p: do.SGDP(p, lr=1e-2, momentum=0.9, dampening=0.1, nesterov=True,
                               weight_decay=0.01, delta=3.0, caution=True),
        reference=lambda p: RefSGDP(p, lr=1e-2, momentum=0.9, dampening=0.1, nesterov=True,
                                    weight_decay=0.01, delta=3.0, caution=True),
        peer=_timm("sgdp", "SGDP", lr=1e-2, momentum=0.9, dampening=0.1, nesterov=True,
                   weight_decay=0.01, delta=3.0, caution=True),
        rosen_lr=1e-3,
        model_lr=0.05,
        shape_aware=True,
        family="sgdp",
    ),
    # ---------------------------------------------------------------- Lars / LARC
    OptimCase(
        "lars",
        make=lambda p: do.Lars(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        reference=lambda p: RefLars(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        peer=_timm("lars", "Lars", lr=0.1, momentum=0.9, weight_decay=0.01),
        rosen_lr=1e-3,
        model_lr=2.0,
        shape_aware=True,
        family="lars",
    ),
    OptimCase(
        "larc-nesterov-adapt",
        make=lambda p: do.Lars(p, lr=0.1, momentum=0.9, nesterov=True, trust_clip=True,
                               always_adapt=True, trust_coeff=0.01),
        reference=lambda p: RefLars(p, lr=0.1, momentum=0.9, nesterov=True, trust_clip=True,
                                    always_adapt=True, trust_coeff=0.01),
        peer=_timm("lars", "Lars", lr=0.1, momentum=0.9, nesterov=True, trust_clip=True,
                   always_adapt=True, trust_coeff=0.01),
        rosen_lr=1.0,
        model_lr=1.0,
        shape_aware=True,
        family="lars",
    ),
    # ---------------------------------------------------------------- NvNovoGrad
    OptimCase(
        "nvnovograd",
        make=lambda p: do.NvNovoGrad(p, lr=1e-2, weight_decay=0.01),
        reference=lambda p: RefNvNovoGrad(p, lr=1e-2, weight_decay=0.01),
        peer=_timm("nvnovograd", "NvNovoGrad", lr=1e-2, weight_decay=0.01),
        rosen_lr=1e-2,
        shape_aware=True,
        family="novograd",
    ),
    OptimCase(
        "nvnovograd-amsgrad-avg-decoupled",
        make=lambda p: do.NvNovoGrad(p, lr=1e-2, weight_decay=0.01, grad_averaging=True, amsgrad=True,
                                     decoupled_decay=True, corrected_weight_decay=True),
        reference=lambda p: RefNvNovoGrad(p, lr=1e-2, weight_decay=0.01, grad_averaging=True,
                                          amsgrad=True, decoupled_decay=True,
                                          corrected_weight_decay=True),
        peer=_timm("nvnovograd", "NvNovoGrad", lr=1e-2, weight_decay=0.01, grad_averaging=True,
                   amsgrad=True, decoupled_decay=True, corrected_weight_decay=True),
        rosen_lr=5e-2,
        model_lr=5e-2,
        shape_aware=True,
        family="novograd",
    ),
]
