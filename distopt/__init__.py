"""distopt: sharding-aware optimizers and learning-rate schedules for distributed PyTorch.

Subpackages:
    distopt.optim       the optimizers (one multi-tensor implementation each) and the factory
    distopt.schedules   learning-rate schedules (LRScheduler subclasses with a pure ``lr_at``)
    distopt.zero        ZeRO-1/ZeRO-2 partitioned optimizer state (``distopt.shard``)
    distopt.checkpoint  sharded, reshardable, crash-safe checkpoints
    distopt.compat      timm- and transformers-shaped facades
"""

from distopt._version import __version__
from distopt.accumulate import GradientAccumulator
from distopt.zero import ShardedModule, clip_grad_norm_, shard

__all__ = ["GradientAccumulator", "ShardedModule", "__version__", "clip_grad_norm_", "shard"]
