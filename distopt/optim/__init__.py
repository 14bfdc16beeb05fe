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
from distopt.optim.adamw import AdamW
from distopt.optim.lamb import Lamb

# -- elementwise optimizers (one module each) --
# -- shape-aware optimizers --
# -- wrappers and factory --
from distopt.optim.lookahead import Lookahead

__all__ = [
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
