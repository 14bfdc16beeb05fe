"""distopt.optim: the optimizers, one multi-tensor implementation each, written against shards.

Every class is a :class:`torch.optim.Optimizer` subclass; hyperparameters live in param groups,
state is created lazily at the first step.  See ``docs/optimizers.md`` for the list, the update
rules and the options of each.
"""

from distopt.optim._core import DistOptimizer, ParamView, ShardSpec, StepContext
from distopt.optim._factory import (
    create_optimizer,
    create_optimizer_v2,
    get_optimizer_class,
    list_optimizers,
    register_optimizer,
)

# -- elementwise optimizers (one module each) --
from distopt.optim.adabelief import AdaBelief
from distopt.optim.adadelta import Adadelta

# -- shape-aware optimizers --
from distopt.optim.adafactor import Adafactor, AdafactorTimm
from distopt.optim.adafactor_bv import AdafactorBigVision
from distopt.optim.adagrad import Adagrad
from distopt.optim.adahessian import Adahessian
from distopt.optim.adam import Adam
from distopt.optim.adam_weight_decay import AdamWeightDecay
from distopt.optim.adamax import Adamax
from distopt.optim.adamp import AdamP
from distopt.optim.adamw import AdamW
from distopt.optim.adan import Adan
from distopt.optim.adopt import Adopt
from distopt.optim.kron import Kron
from distopt.optim.lamb import Lamb
from distopt.optim.laprop import LaProp
from distopt.optim.lars import Lars
from distopt.optim.lion import Lion

# -- wrappers and factory --
from distopt.optim.lookahead import Lookahead
from distopt.optim.madgrad import MADGRAD
from distopt.optim.mars import Mars
from distopt.optim.muon import Muon
from distopt.optim.nadam import Nadam
from distopt.optim.nadamw import NAdamW
from distopt.optim.nvnovograd import NvNovoGrad
from distopt.optim.radam import RAdam
from distopt.optim.rmsprop import RMSprop
from distopt.optim.rmsprop_tf import RMSpropTF
from distopt.optim.schedule_free import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree
from distopt.optim.sgd import SGD
from distopt.optim.sgdp import SGDP
from distopt.optim.sgdw import SGDW

__all__ = [
    "Adafactor",
    "AdafactorTimm",
    "AdafactorBigVision",
    "AdamP",
    "Lars",
    "NvNovoGrad",
    "SGDP",
    "AdaBelief",
    "Adadelta",
    "Adagrad",
    "Adahessian",
    "Adam",
    "AdamWeightDecay",
    "Adamax",
    "MADGRAD",
    "Muon",
    "Kron",
    "Lion",
    "NAdamW",
    "Adopt",
    "LaProp",
    "SGDW",
    "AdamWScheduleFree",
    "RAdamScheduleFree",
    "SGDScheduleFree",
    "Adan",
    "Mars",
    "Nadam",
    "RAdam",
    "RMSprop",
    "RMSpropTF",
    "SGD",
    "AdamW",
    "DistOptimizer",
    "Lamb",
    "Lookahead",
    "create_optimizer",
    "create_optimizer_v2",
    "get_optimizer_class",
    "list_optimizers",
    "register_optimizer",
    "ParamView",
    "ShardSpec",
    "StepContext",
]
