"""Gradient accumulation over micro-batches, exact under every way of running distopt.

::

    acc = distopt.GradientAccumulator(model, steps=4)
    for batch in loader:
        with acc.accumulate(num_items=n_tokens(batch)):  # no gradient sync off the boundary
            loss_sum = model(batch)                      # a SUM over the batch's items
            acc.backward(loss_sum)
        if acc.sync_gradients:                           # True on every 4th micro-batch
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
    if acc.flush():                                      # the stream ended mid-window
        optimizer.step(); scheduler.step(); optimizer.zero_grad()

After the boundary micro-batch the gradients equal those of the *mean* loss over all items of
the window's micro-batches on all ranks, however the items are split between micro-batches and
ranks.  How: every micro-batch is backpropagated with its local SUM; the accumulator keeps the
local item count; at the boundary, after the (averaging) gradient synchronisation of the mode,
ONE all-reduce of a 3-element tensor gives the global count ``N`` and the gradients (the local
shard of them when they are sharded) are multiplied by ``world_size / N`` with one
``_foreach_mul_``.  With ``num_items=None`` the loss of each micro-batch is taken to be a mean and
the window's gradient is the mean of the micro-batch means (multiplied by ``1 / k``; no
collective).

Modes (detected from ``model`` by :func:`distopt.parallel.backend_for`, whose backend does the
mode's part: sync on/off, flush, the gradients to scale, the mid-window state):

* a plain module: one process (or the user synchronises by hand: nothing is communicated);
* ``DistributedDataParallel``: forward *and* backward of off-boundary micro-batches run in
  ``no_sync()``;
* :class:`distopt.zero.ShardedModule` stage 1: nothing is communicated until the boundary, where
  the gradients are reduce-scattered once;
* :class:`distopt.zero.ShardedModule` stage 2: by default off-boundary micro-batches run in
  ``no_sync()`` (the full gradients stay local: no traffic until the boundary, one micro-batch's
  worth of full gradients in memory); ``reduce_every_micro_batch=True`` reduce-scatters every
  micro-batch into the gradient shards instead (less memory, ``k`` times the traffic);
* FSDP2 (``fully_shard``): ``set_requires_gradient_sync(False)`` off the boundary (FSDP2 keeps
  unsharded gradients until then); ``reduce_every_micro_batch=True`` keeps syncing;
* a DeepSpeed engine: DeepSpeed's own accumulation does the work.  The accumulator sets the
  engine's boundary flag from its own count on every micro-batch (so the two always agree),
  calls ``engine.backward`` and calls ``engine.step()`` at the end of every micro-batch (DeepSpeed
  updates only on the boundary, its scheduler included): do not call ``optimizer.step()``
  yourself.  ``gradient_accumulation_steps`` in the DeepSpeed config must equal ``steps``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from distopt.parallel import backend_for

__all__ = ["GradientAccumulator"]

_STATE_KEYS = ("steps", "micro_step", "optimizer_steps", "micro_batches", "items_mode", "items",
               "grads")


# --------------------------------------------------------------------------- helpers


def _check_num_items(num_items: Any) -> float | Tensor | None:
    if num_items is None:
        return None
    if isinstance(num_items, bool):
        raise TypeError("num_items must be a number of items (int/float or a 1-element tensor), got a bool")
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a 1-element tensor, got shape {tuple(num_items.shape)}")
        if num_items.is_complex():
            raise TypeError("num_items must be a real number")
        return num_items.detach().reshape(())
    if isinstance(num_items, numbers.Real):
        value = float(num_items)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"num_items must be a finite number >= 0, got {num_items!r}")
        return value
    raise TypeError(f"num_items must be a number or a 1-element tensor, got {type(num_items).__name__}")


def _checked_count(n: float, sm: float, sm2: float, world: int) -> float:
    """The window's global item count ``n``, checked; ``sm``/``sm2``: the sum over ranks of
    the window's micro-batch count and of its square (equal as ``sm**2 == world * sm2`` iff
    every rank ran the same number)."""
    if sm * sm != world * sm2:
        raise RuntimeError(
            "GradientAccumulator: ranks disagree on the number of micro-batches in this "
            "window; every rank must run the same number of micro-batches"
        )
    if n < 0 or not math.isfinite(n):
        raise ValueError(f"GradientAccumulator: the window's global item count is {n}")
    if n == 0:
        raise ValueError(
            "GradientAccumulator: num_items summed to 0 over every micro-batch of the "
            "window on every rank: the mean loss over no items is undefined (skip such "
            "windows, or pass num_items=None for losses that are already means)"
        )
    return n


# --------------------------------------------------------------------------- the accumulator


class GradientAccumulator:
    """Accumulate gradients over ``steps`` micro-batches, normalised by the global item count.

    Args:
        model: the model as it is trained: a plain module, ``DistributedDataParallel``, a
            :class:`distopt.zero.ShardedModule` (ZeRO-1/2), an FSDP2 (``fully_shard``) model or a
            DeepSpeed engine.
        steps: micro-batches per optimizer step (``k >= 1``).
        reduce_every_micro_batch: sharded gradients only (distopt ZeRO-2, FSDP2).  ``False``
            (default): defer the reduce-scatter to the boundary micro-batch (no traffic off the
            boundary; the full gradients stay in memory meanwhile).  ``True``: reduce-scatter
            every micro-batch into the gradient shards (memory of sharded gradients; ``k`` times
            the traffic).

    Use :meth:`accumulate` around forward and backward of every micro-batch, :meth:`backward`
    for the backward, then step when :attr:`sync_gradients` is true.  Every rank must run the
    same number of micro-batches and use the same convention (``num_items`` given or ``None``);
    item counts may differ between ranks and micro-batches, down to 0.

    Normalisation: with ``num_items`` the loss of a micro-batch is the SUM over its items and the
    window's gradient is that of ``sum(all losses) / sum(all num_items)`` over all micro-batches
    and ranks.  With ``num_items=None`` each loss is a mean and the window's gradient is the
    mean of those means (over micro-batches and ranks).  A window cut short by :meth:`flush` is
    normalised by what it actually contains.

    Nothing is read back to the host at the boundary.  On more than one rank the factor is
    computed on the device from the all-reduced counts and the counts are checked late: a
    window whose global count is 0, or whose ranks disagree on its length, raises on every rank
    alike at the start of the next window (or at :meth:`flush` / :meth:`state_dict`); its
    gradients were scaled by 0.  (One process checks at the boundary; DeepSpeed, which takes
    the factor as a number, too.)

    Raises:
        ValueError: ``steps < 1``; ``reduce_every_micro_batch`` for a mode without sharded
            gradients; a DeepSpeed engine whose ``gradient_accumulation_steps`` is not ``steps``.
        TypeError: ``steps`` not an int; a model that is not a module; FSDP1.
    """

    def __init__(self, model: nn.Module, steps: int = 1, *, reduce_every_micro_batch: bool = False) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"GradientAccumulator: steps must be an int >= 1, got {steps!r}")
        if steps < 1:
            raise ValueError(f"GradientAccumulator: steps must be >= 1, got {steps}")
        self.steps = steps
        self.reduce_every_micro_batch = bool(reduce_every_micro_batch)
        self._backend = backend_for(model)
        self._backend.check_accumulation(steps, self.reduce_every_micro_batch)
        self._micro = 0  # micro-batches accumulated in the current window
        self._items = 0.0  # local item count of the window (numbers)
        self._items_t: Tensor | None = None  # ... (tensors, summed without a host sync)
        self._items_mode: bool | None = None  # True: counts given; False: means; None: empty
        self._sync = False
        self._in_block = False
        self._backward_calls = 0
        self._current_items_mode = False
        # Item counts all-reduced on the device are checked late, from a host copy, so that
        # the boundary reads nothing back (see _close_window): [(host copy, event or None)].
        self._unchecked: list[tuple[Tensor, Any]] = []
        #: optimizer steps taken (windows closed, flushes included)
        self.optimizer_steps = 0
        #: micro-batches seen in total
        self.micro_batches = 0

    # ------------------------------------------------------------------ properties
    @property
    def mode(self) -> str:
        """Which way of running was detected (``"DistributedDataParallel"``, ``"FSDP2"``, ...)."""
        return self._backend.name

    @property
    def sync_gradients(self) -> bool:
        """True inside and after the boundary micro-batch (and after a flush that had work):
        the gradients are synchronised and normalised; step the optimizer now."""
        return self._sync

    @property
    def micro_step(self) -> int:
        """Micro-batches already accumulated in the current window (0 at a window start)."""
        return self._micro

    # ------------------------------------------------------------------ the loop
    @contextmanager
    def accumulate(self, num_items: int | float | Tensor | None = None) -> Iterator[None]:
        """Run forward and backward of one micro-batch inside this context.

        Args:
            num_items: the number of items (tokens, samples) the micro-batch's loss SUMS over
                on this rank (0 allowed); ``None`` when the loss is already a mean.

        Off the boundary the gradients are only accumulated locally (no communication in
        DDP, ZeRO-1 and by default ZeRO-2 / FSDP2); on the boundary they are synchronised and,
        when the block ends, normalised.
        """
        if self._in_block:
            raise RuntimeError("GradientAccumulator.accumulate: blocks cannot be nested")
        items = _check_num_items(num_items)
        mode_of_batch = items is not None
        if self._micro > 0 and self._items_mode is not None and self._items_mode != mode_of_batch:
            raise ValueError(
                "GradientAccumulator.accumulate: num_items must be given for every micro-batch of "
                "a window or for none (sums vs means cannot be mixed)"
            )
        if self._micro == 0:
            self._check_counts(wait=False)
            self._reset_window()
        boundary = self._micro + 1 == self.steps
        self._sync = boundary
        self._in_block = True
        self._backward_calls = 0
        self._current_items_mode = mode_of_batch
        ok = False
        try:
            with self._backend.context(boundary):
                yield
            ok = True
        finally:
            self._in_block = False
            if not ok:
                self._sync = False
        if self._backward_calls == 0:
            self._sync = False
            raise RuntimeError(
                "GradientAccumulator.accumulate: the block ended without acc.backward(loss); "
                "call acc.backward (not loss.backward) inside every accumulate() block"
            )
        self._items_mode = mode_of_batch
        if isinstance(items, Tensor):
            t = items.to(torch.float64 if items.device.type != "mps" else torch.float32)
            self._items_t = t if self._items_t is None else self._items_t + t
        elif items is not None:
            self._items += items
        self._micro += 1
        self.micro_batches += 1
        if boundary:
            self._close_window()
        else:
            self._backend.after_micro_batch()

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """Backpropagate ``loss`` (the micro-batch's SUM over its items, or its mean).

        Only valid inside :meth:`accumulate`; keyword arguments go to ``Tensor.backward``
        (DeepSpeed: to ``engine.backward``).
        """
        if not self._in_block:
            raise RuntimeError(
                "GradientAccumulator.backward must be called inside `with acc.accumulate(...)`: "
                "the accumulator decides there whether this backward synchronises gradients"
            )
        self._backward_calls += 1
        self._backend.backward(loss, self._current_items_mode, **kwargs)

    def flush(self) -> bool:
        """Close a window that ends early (end of an epoch or data stream).

        Synchronises and normalises what the unfinished window accumulated (by its own item
        count, or by its own number of micro-batches for means).  Returns True when there was
        something to step on — then step the optimizer as on a boundary (with DeepSpeed the
        engine has stepped already) — and False when the window was empty.  Every rank must
        call it (it communicates when the window is not empty).
        """
        if self._in_block:
            raise RuntimeError("GradientAccumulator.flush cannot be called inside accumulate()")
        self._check_counts(wait=True)
        if self._micro == 0:
            self._sync = False
            return False
        self._backend.sync_now()
        self._close_window()
        self._sync = True
        return True

    # ------------------------------------------------------------------ internals
    def _reset_window(self) -> None:
        self._items = 0.0
        self._items_t = None
        self._items_mode = None

    def _global_items(self) -> tuple[float, Tensor]:
        """All-reduce [items, micro-batches, micro-batches^2] (one small collective)."""
        m = float(self._micro)
        buf = torch.tensor([self._items, m, m * m], dtype=torch.float64, device=self._backend.device)
        if self._items_t is not None:
            buf[0] += self._items_t.to(buf.device, buf.dtype)
        self._backend.all_reduce_counts(buf)
        return float(buf[0]), buf

    def _close_window(self) -> None:
        m = self._micro
        W = self._backend.data_parallel_world
        factor: float | Tensor
        if not self._items_mode:
            factor = 1.0 / m
        elif W == 1 and self._items_t is None:
            factor = W / _checked_count(self._items, 1.0, 1.0, 1)  # host numbers only
        elif W == 1 or not self._backend.device_factor:
            n, buf = self._global_items()
            factor = W / _checked_count(n, float(buf[1]), float(buf[2]), W)
        else:
            factor = self._device_factor(W)
        try:
            self._backend.finish_window(factor, bool(self._items_mode), m)
        finally:
            self._micro = 0
            self.optimizer_steps += 1

    def _device_factor(self, W: int) -> Tensor:
        """``W / N`` as a float32 tensor on the device, from the all-reduced counts, with no
        host read; the counts are checked later, from a host copy (:meth:`_check_counts`).

        A window that fails the check is scaled by 0 (with no items its gradients are sums over
        nothing); the error is raised, on every rank alike, at the next window's start (or the
        next :meth:`flush` / :meth:`state_dict`).
        """
        m = float(self._micro)
        buf = torch.tensor([self._items, m, m * m], dtype=torch.float64)
        device = self._backend.device
        # CUDA: through pinned memory, not waiting for the stream (a pageable copy would)
        cuda = device.type == "cuda"
        buf = buf.pin_memory().to(device, non_blocking=True) if cuda else buf.to(device)
        if self._items_t is not None:
            items = self._items_t
            if cuda and items.device.type == "cpu":
                items = items.to(buf.dtype).pin_memory()
            buf[0] += items.to(buf.device, buf.dtype, non_blocking=True)
        self._backend.all_reduce_counts(buf)
        n = buf[0]
        ok = (n > 0) & torch.isfinite(n) & (buf[1] * buf[1] == W * buf[2])
        factor = torch.where(ok, W / n, torch.zeros_like(n)).float()
        if buf.device.type == "cuda":
            host = torch.empty(3, dtype=buf.dtype, pin_memory=True)
            host.copy_(buf, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._unchecked.append((host, event))
        else:
            self._unchecked.append((buf, None))  # already in host memory
        return factor

    def _check_counts(self, wait: bool) -> None:
        """Raise for a past window whose counts were bad (every rank holds the same counts,
        so every rank raises the same error).  Without ``wait``, copies still in flight are
        left for later: nothing waits for the device."""
        while self._unchecked:
            host, event = self._unchecked[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            n, sm, sm2 = host.tolist()  # host memory (CUDA: a pinned copy, its copy complete)
            self._unchecked.pop(0)
            _checked_count(n, sm, sm2, self._backend.data_parallel_world)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The position in the window, counters, and — in the middle of a window — what the
        window accumulated so far: its global item count and its gradient SUM over all ranks
        (full tensors keyed by parameter name).  Rank numbers do not appear, so the state loads
        at any world size and in any mode.  Mid-window, every rank must call it (it
        communicates); at a window start (``micro_step == 0``) it is a few numbers.
        """
        if self._in_block:
            raise RuntimeError("GradientAccumulator.state_dict cannot be called inside accumulate()")
        self._check_counts(wait=True)
        sd: dict[str, Any] = {
            "steps": self.steps,
            "micro_step": self._micro,
            "optimizer_steps": self.optimizer_steps,
            "micro_batches": self.micro_batches,
            "items_mode": self._items_mode if self._micro else None,
            "items": 0.0,
            "grads": {},
        }
        if self._micro:
            if self._items_mode:
                sd["items"], _ = self._global_items()
            sd["grads"] = self._backend.gather_grad_sum()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a fresh accumulator (at a window start).

        Mid-window, the saved gradient sum becomes this window's gradients (replacing any) and
        the saved item count is carried on; the next micro-batches complete the window.
        ``steps`` may differ from the saved one only at a window start.
        """
        if self._in_block or self._micro:
            raise RuntimeError(
                "GradientAccumulator.load_state_dict: load at a window start, before the next "
                "accumulate() block"
            )
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise KeyError(f"GradientAccumulator.load_state_dict: missing keys {missing}")
        micro = int(state_dict["micro_step"])
        if micro < 0 or (micro and micro >= self.steps):
            raise ValueError(
                f"GradientAccumulator.load_state_dict: saved micro_step {micro} does not fit a "
                f"window of steps={self.steps}"
            )
        if micro and int(state_dict["steps"]) != self.steps:
            raise ValueError(
                f"GradientAccumulator.load_state_dict: the checkpoint is in the middle of a window "
                f"of {state_dict['steps']} micro-batches; this accumulator has steps={self.steps}"
            )
        self.optimizer_steps = int(state_dict["optimizer_steps"])
        self.micro_batches = int(state_dict["micro_batches"])
        self._reset_window()
        self._sync = False
        if micro:
            self._backend.load_grad_sum(state_dict["grads"])
            self._items_mode = state_dict["items_mode"]
            if self._items_mode and self._backend.rank == 0:
                self._items = float(state_dict["items"])
        self._micro = micro

    def __repr__(self) -> str:
        return (f"GradientAccumulator(steps={self.steps}, mode={self.mode!r}, "
                f"micro_step={self._micro}, optimizer_steps={self.optimizer_steps})")
