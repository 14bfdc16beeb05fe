"""Gradient accumulation of :class:`DistoptTrainer`: which loss to report, which to backpropagate.

When the Trainer normalises by ``num_items_in_batch`` (a model that accepts loss kwargs, or
``compute_loss_func``) each micro-batch is backpropagated as the SUM of its items' losses with its
local item count, and :class:`distopt.GradientAccumulator` divides the window's gradient once by
the global count: the Trainer's own scalings (by ``num_items_in_batch``, by the number of
processes) are undone, so nothing is scaled twice.  Otherwise the losses are means and the
window's gradient is their mean, as in the Trainer.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = [
    "check_item_normalisation",
    "count_items",
    "end_micro_batch",
    "loss_is_scaled",
    "split_loss",
]


def loss_is_scaled(trainer: Any, num_items_in_batch: Any) -> bool:
    """The Trainer's rule: is ``compute_loss``'s value already scaled for accumulation?"""
    if trainer.loss_is_scaled_for_ga is not None:
        return bool(trainer.loss_is_scaled_for_ga)
    return (
        bool(trainer.model_accepts_loss_kwargs) and num_items_in_batch is not None
    ) or trainer.compute_loss_func is not None


def count_items(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """This micro-batch's item count, by the Trainer's rule for ``num_items_in_batch``."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    else:
        labels = inputs["labels"]
        shifts = LOSS_MAPPING.get(
            getattr(model, "loss_type", None)
        ) is ForCausalLMLoss and not getattr(
            getattr(model, "config", None), "is_encoder_decoder", False
        )
        if shifts:
            labels = labels[..., 1:]
    return labels.ne(-100).sum()


def check_item_normalisation(
    items_mode: bool, world: int, average_tokens_across_devices: bool
) -> None:
    """Refuse per-rank item normalisation with several processes (distopt uses the global count)."""
    if items_mode and world > 1 and not average_tokens_across_devices:
        raise ValueError(
            "DistoptTrainer: average_tokens_across_devices=False normalises each rank's loss by "
            "its own item count; distopt normalises by the global count. Set "
            "average_tokens_across_devices=True"
        )


def split_loss(
    loss: Tensor,
    *,
    items_mode: bool,
    scaled: bool,
    num_items_in_batch: Any,
    world: int,
    accumulation_steps: int,
) -> tuple[Tensor, Tensor]:
    """``(loss to report, loss to backpropagate)`` for one micro-batch's ``compute_loss`` value."""
    if items_mode:
        # The Trainer's loss is sum / num_items_in_batch * world (global count): make it
        # the local SUM; distopt divides by the global count once, at the boundary.
        return loss.detach(), loss * (num_items_in_batch / world)
    if scaled:
        # already normalised over the window without item counts: distopt's mean over
        # the window's micro-batches must not divide it again
        return loss.detach(), loss * accumulation_steps
    # a mean per micro-batch: distopt takes the mean over the window
    return loss.detach() / accumulation_steps, loss


def end_micro_batch(acc: Any, boundary: bool) -> None:
    """After a micro-batch: flush a short last window where the Trainer steps the optimizer."""
    if boundary and not acc.sync_gradients:
        acc.flush()  # a short last window of the epoch
    elif acc.sync_gradients and not boundary:
        raise RuntimeError(
            "DistoptTrainer: distopt's accumulator reached an optimizer step where the Trainer "
            "did not (gradient_accumulation_steps changed during training?)"
        )
