"""A DeepSpeed engine: DeepSpeed accumulates, reduces and steps; distopt sets its boundary."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distopt._deepspeed_private import can_scale_gradients, gradients_scaled_by
from distopt.parallel._base import Backend, mul_

__all__ = ["DeepSpeedBackend", "is_deepspeed_engine"]


def is_deepspeed_engine(model: Any) -> bool:
    """Whether ``model`` is a ``deepspeed.DeepSpeedEngine`` (without importing DeepSpeed: a
    process that has not imported it has no engine; a class of that name counts too, so that the
    accumulator's configuration checks run without DeepSpeed)."""
    ds = sys.modules.get("deepspeed")
    engine_cls = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    if engine_cls is not None and isinstance(model, engine_cls):
        return True
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


class DeepSpeedBackend(Backend):
    kind = "deepspeed"
    name = "DeepSpeed"

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.kind = "deepspeed"
        self.gas = int(engine.gradient_accumulation_steps())
        self.group = getattr(engine, "data_parallel_group", None)
        self.world = dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @property
    def _basic(self) -> Any:
        """The client optimizer DeepSpeed steps (inside its wrapper, if any)."""
        eng = self.model
        basic = getattr(eng, "basic_optimizer", None)
        return basic if basic is not None else getattr(eng.optimizer, "optimizer", eng.optimizer)

    def check_accumulation(self, steps: int, reduce_every: bool) -> None:
        engine = self.model
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

    device_factor = False  # the engine takes its gradient scale as a number

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
        if can_scale_gradients(opt):
            # DeepSpeed ZeRO divides the gradients by its loss scale before clipping and
            # stepping: dividing by scale / factor normalises them before the clip, as wanted.
            with gradients_scaled_by(opt, factor):
                eng.step()
            return
        if opt is self._basic:
            # No ZeRO, fp32: the client optimizer steps on the module's gradients; DeepSpeed
            # clips them first, so normalise them now.
            grads = [p.grad for p in eng.module.parameters() if p.grad is not None]
            mul_(grads, factor)
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
        raise RuntimeError(
            "GradientAccumulator.load_state_dict: DeepSpeed resumes only at a window boundary"
        )
