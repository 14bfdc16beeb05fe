"""Cases: the element-wise optimizers (timm's and torch.optim's), several per class for the options.

Peers are timm's implementations (loaded without torchvision) and ``torch.optim`` (single-tensor
path, ``foreach=False``) for the torch-named classes.
"""

from __future__ import annotations

import torch

import distopt.optim as do
from tests import references_elementwise as R
from tests.optim_cases import OptimCase
from tests.references import load_timm_optim


def _timm(module, cls, **kw):
    def make(params):
        mod = load_timm_optim(module)
        return None if mod is None else getattr(mod, cls)(params, **kw)

    return make


def _torch(cls, **kw):
    def make(params):
        return getattr(torch.optim, cls)(params, foreach=False, **kw)

    return make


def _case(id, cls, ref, peer=None, family="", **kw):
    """A case whose distopt class, reference and peer take the same keyword arguments ``kw``."""
    opts = {k: kw.pop(k) for k in list(kw) if k in OptimCase.__dataclass_fields__}
    return OptimCase(
        id,
        make=lambda p: cls(p, **kw),
        reference=None if ref is None else (lambda p: ref(p, **kw)),
        peer=None if peer is None else peer(**kw),
        family=family,
        **opts,
    )


def _timm_peer(module, cls):
    return lambda **kw: _timm(module, cls, **kw)


def _torch_peer(cls):
    return lambda **kw: _torch(cls, **kw)


_ADABELIEF = _timm_peer("adabelief", "AdaBelief")
_RADAM = _timm_peer("radam", "RAdamLegacy")
_NADAM = _timm_peer("nadam", "NAdamLegacy")
_RMSPROPTF = _timm_peer("rmsprop_tf", "RMSpropTF")
_MADGRAD = _timm_peer("madgrad", "MADGRAD")
_ADAHESSIAN = _timm_peer("adahessian", "Adahessian")

CASES = [
    # -- AdaBelief: rectified (default), plain, amsgrad, L2 / fixed decay, no SGD fallback
    _case("adabelief", do.AdaBelief, R.RefAdaBelief, _ADABELIEF, "adabelief",
          lr=1e-2, weight_decay=0.05, rosen_lr=3e-3),
    _case("adabelief-norectify", do.AdaBelief, R.RefAdaBelief, _ADABELIEF, "adabelief",
          lr=1e-2, weight_decay=0.05, rectify=False, eps=1e-8, rosen_lr=1e-2),
    _case("adabelief-amsgrad", do.AdaBelief, R.RefAdaBelief, _ADABELIEF, "adabelief",
          lr=1e-2, amsgrad=True, rectify=False, rosen_lr=1e-2),
    _case("adabelief-amsgrad-rectify", do.AdaBelief, R.RefAdaBelief, _ADABELIEF, "adabelief",
          lr=1e-2, amsgrad=True, betas=(0.8, 0.9), rosen_lr=3e-3),
    _case("adabelief-l2", do.AdaBelief, R.RefAdaBelief, _ADABELIEF, "adabelief",
          lr=1e-2, weight_decay=0.05, decoupled_decay=False, rosen_lr=3e-3),
    _case("adabelief-fixed-decay-nosgd", do.AdaBelief, R.RefAdaBelief, _ADABELIEF, "adabelief",
          lr=1e-2, weight_decay=1e-3, fixed_decay=True, degenerated_to_sgd=False, rosen_lr=3e-3),
    # -- RAdam (timm RAdamLegacy)
    _case("radam", do.RAdam, R.RefRAdam, _RADAM, "radam", lr=1e-2, weight_decay=0.05, rosen_lr=3e-3),
    _case("radam-betas", do.RAdam, R.RefRAdam, _RADAM, "radam", lr=1e-2, betas=(0.8, 0.95), rosen_lr=3e-3),
    # -- Nadam (timm NAdamLegacy)
    _case("nadam", do.Nadam, R.RefNadam, _NADAM, "nadam", lr=1e-2, weight_decay=0.05, rosen_lr=1e-2),
    _case("nadam-schedule", do.Nadam, R.RefNadam, _NADAM, "nadam",
          lr=1e-2, betas=(0.8, 0.99), schedule_decay=0.1, rosen_lr=1e-2),
    # -- RMSpropTF: plain, TF momentum, torch-style momentum + centered + L2, decoupled/corrected decay, caution
    _case("rmsproptf", do.RMSpropTF, R.RefRMSpropTF, _RMSPROPTF, "rmsprop", lr=1e-2, rosen_lr=3e-3),
    _case("rmsproptf-momentum", do.RMSpropTF, R.RefRMSpropTF, _RMSPROPTF, "rmsprop",
          lr=1e-2, momentum=0.9, rosen_lr=1e-3),
    _case("rmsproptf-centered-torchstyle", do.RMSpropTF, R.RefRMSpropTF, _RMSPROPTF, "rmsprop",
          lr=1e-2, momentum=0.9, centered=True, lr_in_momentum=False, weight_decay=0.01, rosen_lr=1e-3),
    _case("rmsproptf-decoupled-corrected", do.RMSpropTF, R.RefRMSpropTF, _RMSPROPTF, "rmsprop",
          lr=1e-2, momentum=0.5, weight_decay=0.05, decoupled_decay=True, corrected_weight_decay=True,
          rosen_lr=3e-3),
    _case("rmsproptf-caution", do.RMSpropTF, R.RefRMSpropTF, _RMSPROPTF, "rmsprop",
          lr=1e-2, momentum=0.9, caution=True, rosen_lr=1e-3, shape_aware=True),
    # -- MADGRAD: momentum (default), no momentum + L2, decoupled decay
    _case("madgrad", do.MADGRAD, R.RefMADGRAD, _MADGRAD, "madgrad", lr=1e-2, rosen_lr=1e-3),
    _case("madgrad-nomomentum-l2", do.MADGRAD, R.RefMADGRAD, _MADGRAD, "madgrad",
          lr=1e-2, momentum=0.0, weight_decay=0.01, rosen_lr=1e-4),
    _case("madgrad-decoupled", do.MADGRAD, R.RefMADGRAD, _MADGRAD, "madgrad",
          lr=1e-2, weight_decay=0.05, decoupled_decay=True, rosen_lr=1e-3),
    # -- torch.optim's element-wise optimizers (peer: torch.optim, foreach=False)
    _case("sgd", do.SGD, R.RefSGD, _torch_peer("SGD"), "sgd", lr=1e-2, rosen_lr=1e-3, model_lr=0.1),
    _case("sgd-momentum-dampening", do.SGD, R.RefSGD, _torch_peer("SGD"), "sgd",
          lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.05, rosen_lr=1e-3, model_lr=5e-2),
    _case("sgd-nesterov", do.SGD, R.RefSGD, _torch_peer("SGD"), "sgd",
          lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01, rosen_lr=1e-3),
    _case("adam", do.Adam, R.RefAdam, _torch_peer("Adam"), "adam", lr=1e-2, weight_decay=0.05, rosen_lr=1e-2),
    _case("adam-amsgrad", do.Adam, R.RefAdam, _torch_peer("Adam"), "adam",
          lr=1e-2, weight_decay=0.05, amsgrad=True, rosen_lr=1e-2),
    _case("adam-decoupled", do.Adam, R.RefAdam, _torch_peer("Adam"), "adam",
          lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True, rosen_lr=1e-2),
    _case("adamax", do.Adamax, R.RefAdamax, _torch_peer("Adamax"), "adamax", lr=1e-2, weight_decay=0.05,
          rosen_lr=1e-2),
    _case("adagrad", do.Adagrad, R.RefAdagrad, _torch_peer("Adagrad"), "adagrad",
          lr=5e-2, weight_decay=0.01, rosen_lr=1e-1, model_lr=5e-2),
    _case("adagrad-decay-init", do.Adagrad, R.RefAdagrad, _torch_peer("Adagrad"), "adagrad",
          lr=5e-2, lr_decay=0.01, initial_accumulator_value=0.1, rosen_lr=1.0, model_lr=5e-2),
    _case("adadelta", do.Adadelta, R.RefAdadelta, _torch_peer("Adadelta"), "adadelta",
          lr=1.0, weight_decay=0.01, rosen_lr=0.5, model_lr=1.0),
    _case("adadelta-rho", do.Adadelta, R.RefAdadelta, _torch_peer("Adadelta"), "adadelta",
          lr=0.5, rho=0.5, eps=1e-5, rosen_lr=0.5, model_lr=1.0),
    _case("rmsprop", do.RMSprop, R.RefRMSprop, _torch_peer("RMSprop"), "rmsprop", lr=1e-2, rosen_lr=1e-2),
    _case("rmsprop-centered-momentum", do.RMSprop, R.RefRMSprop, _torch_peer("RMSprop"), "rmsprop",
          lr=1e-2, centered=True, momentum=0.9, weight_decay=0.01, rosen_lr=1e-3),
    # -- AdamWeightDecay (transformers' TF optimizer; no peer: needs TensorFlow). Name patterns are
    #    covered in tests/test_optim_elementwise.py (the table's problems have unnamed tensors).
    _case("adamweightdecay", do.AdamWeightDecay, R.RefAdamWeightDecay, None, "adam",
          lr=1e-2, weight_decay=0.05, rosen_lr=1e-2),
    _case("adamweightdecay-amsgrad-clipvalue", do.AdamWeightDecay, R.RefAdamWeightDecay, None, "adam",
          lr=1e-2, weight_decay=0.05, amsgrad=True, clipvalue=1.0, rosen_lr=1e-2),
    _case("adamweightdecay-clipnorm", do.AdamWeightDecay, R.RefAdamWeightDecay, None, "adam",
          lr=1e-2, weight_decay=0.05, clipnorm=2.0, rosen_lr=1e-2, shape_aware=True),
    _case("adamweightdecay-global-clipnorm", do.AdamWeightDecay, R.RefAdamWeightDecay, None, "adam",
          lr=1e-2, weight_decay=0.05, global_clipnorm=3.0, clipvalue=1.5, rosen_lr=1e-2, shape_aware=True),
    # -- Adahessian (timm): the quadratic test problem has a diagonal Hessian, so the Hutchinson
    #    estimate is exact whatever the Rademacher draws and the peer agrees to fp32 rounding.
    _case("adahessian", do.Adahessian, R.RefAdahessian, _ADAHESSIAN, "adahessian",
          lr=0.1, weight_decay=0.01, create_graph=True, rosen_lr=1.0, model_lr=0.1),
    _case("adahessian-options", do.Adahessian, R.RefAdahessian, _ADAHESSIAN, "adahessian",
          lr=0.05, hessian_power=0.5, update_each=3, n_samples=2, avg_conv_kernel=True, create_graph=True,
          rosen_lr=0.05, model_lr=0.05),
]
