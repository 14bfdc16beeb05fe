"""transformers' TensorFlow ``GradientAccumulator``, in PyTorch form.

The TensorFlow utility (``transformers.optimization_tf.GradientAccumulator``, gone from
transformers 5) sums lists of gradients on the current replica, without any synchronisation,
and leaves scaling and applying them to the caller.  This class keeps its behaviour:

* ``acc(gradients)`` adds a list of gradients (entries may be ``None``) into buffers created, as
  zeros shaped like the gradients, on the first call; a later call with a list of another
  length raises ``ValueError``; a ``None`` on either side is skipped; every call counts one step;
* ``acc.step``: the number of calls since the last reset, a 0-dim int64 tensor (0 before any);
* ``acc.gradients``: the accumulated gradients (copies; ``None`` kept), ``ValueError`` before
  the first call;
* ``acc.reset()``: step back to 0 and buffers to zero (nothing to do before the first call).

For training loops (DDP, ZeRO, FSDP2, DeepSpeed, loss normalisation by item count) use
:class:`distopt.GradientAccumulator` instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["GradientAccumulator"]


class GradientAccumulator:
    """Sum gradients over calls, locally and without synchronisation (TensorFlow-side API).

    Example::

        acc = GradientAccumulator()
        for batch in micro_batches:
            loss = model(batch)
            acc(torch.autograd.grad(loss, params))
        grads = [g / int(acc.step) for g in acc.gradients]   # scale as needed
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        acc.reset()
    """

    def __init__(self) -> None:
        self._gradients: list[Tensor | None] = []
        self._steps = 0
        self._initialised = False

    @property
    def step(self) -> Tensor:
        """Number of accumulated calls since the last reset (0-dim int64 tensor)."""
        return torch.tensor(self._steps, dtype=torch.int64)

    @property
    def gradients(self) -> list[Tensor | None]:
        """The accumulated gradients (copies), ``None`` where the first call had ``None``."""
        if not self._initialised:
            raise ValueError("The accumulator should be called first to initialize the gradients")
        return [g.clone() if g is not None else None for g in self._gradients]

    @torch.no_grad()
    def __call__(self, gradients: Iterable[Tensor | None]) -> None:
        """Add ``gradients`` (a list of tensors or ``None``) to the accumulated ones."""
        gradients = list(gradients)
        for g in gradients:
            if g is not None and not isinstance(g, Tensor):
                raise TypeError(f"gradients must be tensors or None, got {type(g).__name__}")
        if not self._initialised:
            self._gradients = [torch.zeros_like(g) if g is not None else None for g in gradients]
            self._initialised = True
        if len(gradients) != len(self._gradients):
            raise ValueError(f"Expected {len(self._gradients)} gradients, but got {len(gradients)}")
        for acc, g in zip(self._gradients, gradients):
            if acc is not None and g is not None:
                acc.add_(g.detach())
        self._steps += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Set the step count to 0 and the accumulated gradients to zero."""
        if not self._initialised:
            return
        self._steps = 0
        for g in self._gradients:
            if g is not None:
                g.zero_()

    def __repr__(self) -> str:
        n = len(self._gradients) if self._initialised else "uninitialised"
        return f"GradientAccumulator(step={self._steps}, gradients={n})"
