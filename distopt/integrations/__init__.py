"""Adapters between distopt and outside training engines (never maths).

* :mod:`distopt.integrations.accelerate` — Hugging Face Accelerate: ``prepare`` (distopt
  optimizers, sharded or not, and schedules through ``accelerator.prepare``), complete sharded
  state in ``accelerator.save_state`` / ``load_state``, gradient accumulation that agrees with
  ``accelerator.accumulate``, schedules stepped once per optimizer step at any world size.
* :mod:`distopt.integrations.transformers` — ``transformers.Trainer``: ``DistoptTrainer`` (any
  distopt optimizer and schedule, distopt ZeRO with the user's module kept as ``trainer.model``,
  accumulation by global item counts, sharded state in the Trainer's checkpoints).
* :mod:`distopt.integrations.deepspeed` — DeepSpeed: ``initialize`` with a distopt optimizer
  and schedule; element-wise optimizers run as ZeRO-1/2 client optimizers, shape-aware ones are
  refused with an error that points to ``distopt.shard``.

Importing this package imports neither Accelerate, DeepSpeed nor transformers; each submodule
imports its engine when it is used.  See docs/integrations.md.
"""

__all__ = ["accelerate", "deepspeed", "transformers"]
