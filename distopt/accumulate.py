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

Modes (detected from ``model``):

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
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt._dtensor import is_dtensor

__all__ = ["GradientAccumulator"]

_STATE_KEYS = ("steps", "micro_step", "optimizer_steps", "micro_batches", "items_mode", "items",
               "grads")


# --------------------------------------------------------------------------- helpers



def _local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (in place ops on it change the DTensor), else ``t``."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def _mul_(grads: list[Tensor], factor: float) -> None:
    grads = [g for g in grads if g.numel()]
    if grads and factor != 1.0:
        with torch.no_grad():
            torch._foreach_mul_(grads, factor)


def _all_reduce_sum(tensors: list[Tensor | None], group: Any, like: list[Tensor]) -> list[Tensor | None]:
    """Sum ``tensors`` across ranks in one flat buffer per dtype/device; ``None`` counts as zeros.

    ``like[i]`` gives the shape, dtype and device of entry ``i``.  Returns the sums, ``None``
    where no rank had a tensor (one flag per entry rides along in each buffer).
    """
    out: list[Tensor | None] = [None] * len(like)
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, ref in enumerate(like):
        kinds.setdefault((ref.dtype, ref.device), []).append(i)
    for (dtype, device), idx in kinds.items():
        sizes = [like[i].numel() for i in idx]
        flat = torch.zeros(sum(sizes) + len(idx), dtype=dtype, device=device)
        off = 0
        for j, (i, n) in enumerate(zip(idx, sizes)):
            t = tensors[i]
            if t is not None:
                flat[off : off + n].copy_(t.detach().reshape(-1))
                flat[sum(sizes) + j] = 1
            off += n
        dist.all_reduce(flat, group=group)
        flags = flat[sum(sizes) :].tolist()
        off = 0
        for j, (i, n) in enumerate(zip(idx, sizes)):
            if flags[j] > 0:
                out[i] = flat[off : off + n].view(like[i].shape).clone()
            off += n
    return out


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


# --------------------------------------------------------------------------- modes


class _Mode:
    """How one way of running synchronises, where its gradients live, how to save them."""

    name = "single process"
    world = 1
    group: Any = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return _local(p).device
        return torch.device("cpu")

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.world > 1 else 0

    def context(self, sync: bool) -> AbstractContextManager[Any]:
        """Wraps forward and backward of one micro-batch."""
        return nullcontext()

    def backward(self, loss: Tensor, items_mode: bool, **kwargs: Any) -> None:
        loss.backward(**kwargs)

    def sync_now(self) -> None:
        """Synchronise gradients still held locally (a window that ends early)."""

    def grads(self) -> list[Tensor]:
        """The synchronised gradients this rank holds (its shards when sharded)."""
        return [_local(p.grad) for p in self.model.parameters() if p.grad is not None]

    def after_micro_batch(self) -> None:
        """End of an off-boundary micro-batch."""

    def finish_window(self, factor: float, items_mode: bool, micro_batches: int) -> None:
        """Normalise the synchronised gradients (and step, for engines that step themselves)."""
        _mul_(self.grads(), factor)

    def named_params(self) -> list[tuple[str, Tensor]]:
        return list(self.model.named_parameters())

    # mid-window checkpoints: the window's gradient SUM so far (all ranks), by parameter name
    def gather_grad_sum(self) -> dict[str, Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.named_params() if p.grad is not None}

    def load_grad_sum(self, grads: dict[str, Tensor]) -> None:
        for n, p in self.named_params():
            g = grads.get(n)
            p.grad = None if g is None or self.rank != 0 else g.to(p.device, p.dtype).clone()


class _DDP(_Mode):
    name = "DistributedDataParallel"

    def __init__(self, model: nn.Module, reduce_every: bool) -> None:
        super().__init__(model)
        if reduce_every:
            raise ValueError(
                "GradientAccumulator: reduce_every_micro_batch applies to sharded gradients "
                "(distopt ZeRO-2, FSDP2); DDP keeps full gradients either way, so syncing every "
                "micro-batch would only add traffic"
            )
        self.group = model.process_group
        self.world = dist.get_world_size(self.group)

    def context(self, sync: bool) -> AbstractContextManager[Any]:
        return nullcontext() if sync else self.model.no_sync()

    def named_params(self) -> list[tuple[str, Tensor]]:
        return list(self.model.module.named_parameters())

    def sync_now(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        sums = _all_reduce_sum([p.grad for p in params], self.group, params)
        with torch.no_grad():
            for p, s in zip(params, sums):
                if s is not None:
                    s.div_(self.world)  # average, as DDP does
                    if p.grad is None:
                        p.grad = s
                    else:
                        p.grad.copy_(s)

    def gather_grad_sum(self) -> dict[str, Tensor]:
        named = [(n, p) for n, p in self.named_params() if p.requires_grad]
        sums = _all_reduce_sum([p.grad for _, p in named], self.group, [p for _, p in named])
        return {n: s for (n, _), s in zip(named, sums) if s is not None}


class _Zero(_Mode):
    def __init__(self, model: nn.Module, reduce_every: bool) -> None:
        super().__init__(model)
        self.engine = model.engine
        self.stage = self.engine.stage
        if reduce_every and self.stage != 2:
            raise ValueError(
                "GradientAccumulator: reduce_every_micro_batch needs distopt ZeRO stage 2 "
                "(stage 1 reduce-scatters the gradients once, at the boundary)"
            )
        self.reduce_every = reduce_every
        self.name = f"distopt ZeRO-{self.stage}"
        self.group = self.engine.group
        self.world = self.engine.world

    @property
    def rank(self) -> int:
        return self.engine.rank

    def context(self, sync: bool) -> AbstractContextManager[Any]:
        if sync or self.reduce_every:
            return nullcontext()
        return self.model.no_sync()

    def sync_now(self) -> None:
        self.engine.reduce_gradients()

    def grads(self) -> list[Tensor]:
        self.engine.reduce_gradients()  # stage 1: the one reduce-scatter of the window
        return [t.grad for t in self.engine.shards if t.grad is not None]

    def named_params(self) -> list[tuple[str, Tensor]]:
        return [(s.name, s.param) for s in self.engine.slots]

    def gather_grad_sum(self) -> dict[str, Tensor]:
        # Reducing early is harmless: later reductions of the window add into the same shards.
        self.engine.reduce_gradients()
        eng = self.engine
        fulls: list[Tensor] = []
        mine: list[Tensor | None] = []
        for s in eng.slots:
            full = torch.zeros(s.shape, dtype=s.param.dtype, device=s.param.device)
            g = eng.shards[s.index].grad
            if g is not None and s.local_numel(eng.rank):
                rows = s.rows_view(full, eng.rank)
                rows.copy_(g.reshape(rows.shape).to(full.dtype))
                full.mul_(eng.world)  # the shards hold averages
            fulls.append(full)
            mine.append(full if g is not None else None)
        sums = _all_reduce_sum(mine, self.group, fulls)
        return {s.name: t for s, t in zip(eng.slots, sums) if t is not None}

    def load_grad_sum(self, grads: dict[str, Tensor]) -> None:
        self.engine.zero_grad(set_to_none=True)
        super().load_grad_sum(grads)
        self.engine._pending = any(s.param.grad is not None for s in self.engine.slots)


class _FSDP2(_Mode):
    name = "FSDP2"

    def __init__(self, model: nn.Module, fsdp_modules: list[nn.Module], reduce_every: bool) -> None:
        super().__init__(model)
        self.fsdp_modules = fsdp_modules
        names = {m: n for n, m in model.named_modules()}
        roots = []
        for m in fsdp_modules:
            n = names[m]
            if not any(n != names[o] and (names[o] == "" or n.startswith(names[o] + "."))
                       for o in fsdp_modules):
                roots.append(m)
        self.roots = roots
        self.reduce_every = reduce_every
        mesh = None
        for p in model.parameters():
            if is_dtensor(p):
                mesh = p.device_mesh
                break
        if mesh is None:
            raise ValueError("GradientAccumulator: an FSDP2 model without DTensor parameters")
        self.mesh = mesh
        self.world = mesh.size()
        self.group = mesh.get_group() if mesh.ndim == 1 else None
        if mesh.ndim != 1:
            raise NotImplementedError(
                "GradientAccumulator: FSDP2 on a multi-dimensional device mesh (HSDP) is not "
                "supported yet; use a 1-D mesh"
            )

    def _set_sync(self, sync: bool) -> None:
        for m in self.roots:
            m.set_requires_gradient_sync(sync)

    @contextmanager
    def _ctx(self, sync: bool) -> Iterator[None]:
        self._set_sync(sync or self.reduce_every)
        try:
            yield
        finally:
            self._set_sync(True)

    def context(self, sync: bool) -> AbstractContextManager[Any]:
        return self._ctx(sync)

    def sync_now(self) -> None:
        # FSDP2 has no public "reduce the accumulated gradients now"; its end-of-backward
        # callback does exactly that for every parameter group that holds unsharded gradients.
        self._set_sync(True)
        for m in self.roots:
            state = m._get_fsdp_state()
            callback = getattr(state, "_root_post_backward_final_callback", None)
            if callback is None:  # pragma: no cover - other torch versions
                raise RuntimeError(
                    "GradientAccumulator.flush: this torch's FSDP2 cannot reduce gradients "
                    "outside a backward pass; end every window with a full set of micro-batches"
                )
            callback()

    def gather_grad_sum(self) -> dict[str, Tensor]:
        self.sync_now()
        out: dict[str, Tensor] = {}
        for n, p in self.model.named_parameters():
            g = p.grad
            if g is None:
                continue
            full = g.full_tensor() if is_dtensor(g) else g
            out[n] = full.detach().clone() * self.world  # FSDP2 holds averages
        return out

    def load_grad_sum(self, grads: dict[str, Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        for n, p in self.model.named_parameters():
            g = grads.get(n)
            if g is None:
                p.grad = None
                continue
            g = g.to(_local(p).device, p.dtype) / self.world
            if is_dtensor(p):
                p.grad = distribute_tensor(g, p.device_mesh, p.placements)
            else:
                p.grad = g


class _DeepSpeed(_Mode):
    name = "DeepSpeed"

    def __init__(self, engine: Any, steps: int, reduce_every: bool) -> None:
        super().__init__(engine)
        if reduce_every:
            raise ValueError(
                "GradientAccumulator: reduce_every_micro_batch does not apply to DeepSpeed (its "
                "ZeRO stage decides when gradients are reduced)"
            )
        gas = int(engine.gradient_accumulation_steps())
        if gas != steps:
            raise ValueError(
                f"GradientAccumulator: the DeepSpeed engine accumulates over "
                f"gradient_accumulation_steps={gas} micro-batches but the accumulator was built "
                f"with steps={steps}; set them equal (DeepSpeed scales and steps by its own count)"
            )
        self.gas = gas
        self.group = getattr(engine, "data_parallel_group", None)
        self.world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        basic = getattr(engine, "basic_optimizer", None)
        self._basic = basic if basic is not None else getattr(engine.optimizer, "optimizer", engine.optimizer)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def context(self, sync: bool) -> AbstractContextManager[Any]:
        # Set on every micro-batch: DeepSpeed's boundary is always the accumulator's.
        self.model.set_gradient_accumulation_boundary(sync)
        return nullcontext()

    def backward(self, loss: Tensor, items_mode: bool, **kwargs: Any) -> None:
        # Item counts: backpropagate the local sum unscaled; means: DeepSpeed's own 1/gas.
        self.model.backward(loss, scale_wrt_gas=not items_mode, **kwargs)

    def after_micro_batch(self) -> None:
        self.model.step()  # not a boundary: DeepSpeed only counts the micro-step

    def sync_now(self) -> None:
        # A backward of zero through every parameter, on a boundary: DeepSpeed runs its own
        # boundary reduction (whatever the ZeRO stage) and adds nothing to the gradients.
        eng = self.model
        eng.set_gradient_accumulation_boundary(True)
        params = [p for p in eng.module.parameters() if p.requires_grad]
        zero = torch.stack([p.reshape(-1)[:1].sum() * 0.0 for p in params if p.numel()]).sum()
        eng.backward(zero, scale_wrt_gas=False)

    def finish_window(self, factor: float, items_mode: bool, micro_batches: int) -> None:
        eng = self.model
        if not items_mode:
            factor *= self.gas  # DeepSpeed already divided by gradient_accumulation_steps
        if not eng.is_gradient_accumulation_boundary():  # pragma: no cover - defensive
            raise RuntimeError(
                "GradientAccumulator: the DeepSpeed engine does not see the accumulation boundary "
                "the accumulator is at"
            )
        if abs(factor - 1.0) <= 1e-12:
            eng.step()
            return
        opt = eng.optimizer
        if all(hasattr(opt, a) for a in ("custom_loss_scaler", "external_loss_scale", "loss_scale")):
            # DeepSpeed ZeRO divides the gradients by its loss scale before clipping and
            # stepping: dividing by scale / factor normalises them before the clip, as wanted.
            saved = (opt.custom_loss_scaler, opt.external_loss_scale)
            opt.custom_loss_scaler, opt.external_loss_scale = True, float(opt.loss_scale) / factor
            try:
                eng.step()
            finally:
                opt.custom_loss_scaler, opt.external_loss_scale = saved
            return
        if opt is self._basic:
            # No ZeRO, fp32: the client optimizer steps on the module's gradients; DeepSpeed
            # clips them first, so normalise them now.
            grads = [p.grad for p in eng.module.parameters() if p.grad is not None]
            _mul_(grads, factor)
            eng.step()
            return
        raise NotImplementedError(  # pragma: no cover - fp16/bf16 optimizers without ZeRO
            f"GradientAccumulator: normalising gradients inside DeepSpeed's "
            f"{type(opt).__name__} is not supported; use ZeRO stage >= 1, or fp32, or "
            "num_items=None with full windows"
        )

    def gather_grad_sum(self) -> dict[str, Tensor]:
        raise RuntimeError(
            "GradientAccumulator.state_dict: with DeepSpeed, checkpoint at an optimizer-step "
            "boundary (micro_step 0); DeepSpeed keeps the mid-window gradients in its own buffers"
        )

    def load_grad_sum(self, grads: dict[str, Tensor]) -> None:
        raise RuntimeError("GradientAccumulator.load_state_dict: DeepSpeed resumes only at a window boundary")


def _is_deepspeed_engine(model: Any) -> bool:
    ds = sys.modules.get("deepspeed")
    engine_cls = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    if engine_cls is not None and isinstance(model, engine_cls):
        return True
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def _make_mode(model: nn.Module, steps: int, reduce_every: bool) -> _Mode:
    from torch.nn.parallel import DistributedDataParallel

    from distopt.zero import ShardedModule

    if _is_deepspeed_engine(model):
        return _DeepSpeed(model, steps, reduce_every)
    if isinstance(model, ShardedModule):
        return _Zero(model, reduce_every)
    if isinstance(model, DistributedDataParallel):
        return _DDP(model, reduce_every)
    if not isinstance(model, nn.Module):
        raise TypeError(f"GradientAccumulator: model must be an nn.Module (or a DeepSpeed engine), got {type(model).__name__}")
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise TypeError(
            "GradientAccumulator: FSDP1 (FullyShardedDataParallel) is not supported; use FSDP2 "
            "(torch.distributed.fsdp.fully_shard)"
        )
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        FSDPModule = None  # noqa: N806
    fsdp = [m for m in model.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
    if fsdp:
        return _FSDP2(model, fsdp, reduce_every)
    return _Mode(model)


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
        self._mode = _make_mode(model, steps, self.reduce_every_micro_batch)
        self._micro = 0  # micro-batches accumulated in the current window
        self._items = 0.0  # local item count of the window (numbers)
        self._items_t: Tensor | None = None  # ... (tensors, summed without a host sync)
        self._items_mode: bool | None = None  # True: counts given; False: means; None: empty
        self._sync = False
        self._in_block = False
        self._backward_calls = 0
        self._current_items_mode = False
        #: optimizer steps taken (windows closed, flushes included)
        self.optimizer_steps = 0
        #: micro-batches seen in total
        self.micro_batches = 0

    # ------------------------------------------------------------------ properties
    @property
    def mode(self) -> str:
        """Which way of running was detected (``"DistributedDataParallel"``, ``"FSDP2"``, ...)."""
        return self._mode.name

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
            self._reset_window()
        boundary = self._micro + 1 == self.steps
        self._sync = boundary
        self._in_block = True
        self._backward_calls = 0
        self._current_items_mode = mode_of_batch
        ok = False
        try:
            with self._mode.context(boundary):
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
            self._mode.after_micro_batch()

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
        self._mode.backward(loss, self._current_items_mode, **kwargs)

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
        if self._micro == 0:
            self._sync = False
            return False
        self._mode.sync_now()
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
        buf = torch.tensor([self._items, m, m * m], dtype=torch.float64, device=self._mode.device)
        if self._items_t is not None:
            buf[0] += self._items_t.to(buf.device, buf.dtype)
        if self._mode.world > 1:
            dist.all_reduce(buf, group=self._mode.group)
        return float(buf[0]), buf

    def _close_window(self) -> None:
        m = self._micro
        W = self._mode.world
        if self._items_mode:
            n, buf = self._global_items()
            sm, sm2 = float(buf[1]), float(buf[2])
            if sm * sm != W * sm2:  # equal iff every rank has the same window length
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
            factor = W / n
        else:
            factor = 1.0 / m
        try:
            self._mode.finish_window(factor, bool(self._items_mode), m)
        finally:
            self._micro = 0
            self.optimizer_steps += 1

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
            sd["grads"] = self._mode.gather_grad_sum()
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
            self._mode.load_grad_sum(state_dict["grads"])
            self._items_mode = state_dict["items_mode"]
            if self._items_mode and self._mode.rank == 0:
                self._items = float(state_dict["items"])
        self._micro = micro

    def __repr__(self) -> str:
        return (f"GradientAccumulator(steps={self.steps}, mode={self.mode!r}, "
                f"micro_step={self._micro}, optimizer_steps={self.optimizer_steps})")
