"""Kept stacks of the states of equal small tensors (the factored runner's unfactored units).

A unit of several equal-shaped unfactored tensors (ViT-S's biases and norms) is updated by one
call over a ``(rows, cols)`` stack.  Its states are kept as views of one stack per state name,
made once, so the calls update them in place (no stack and no copy back per step); see
:func:`kept_stacks`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from distopt.optim._core import ParamView

__all__ = ["kept_stacks"]


#: (state names, ids of a unit's parameters) -> (weak references to its state tensors per name,
#: their addresses): the states of a unit of equal unfactored tensors, views of one stack per
#: name (see :func:`kept_stacks`); the entry goes when one of its state tensors does
_stacks: dict[tuple, tuple] = {}


def kept_stacks(
    group: list[ParamView], names: tuple[str, ...], rows: int, cols: int
) -> list[Tensor] | None:
    """The states ``names`` of a unit of several equal unfactored tensors as ``(rows, cols)``
    stacks kept across steps (None for a single tensor, or where a state column is no set of
    plain contiguous tensors of the values' shape and one dtype).

    The first call stacks each state column once and makes every ``state[name]`` a view of its
    stack (same shape, dtype and values), so the phases update the states in place: no stack
    per step and no copy back (~75 of ViT-S's biases and norms in one unit: ~1 ms of Big
    Vision's step for its two columns).  Kept while every state is the same tensor at the same
    address; anything else (a ``load_state_dict``, a state replaced or given new memory) stacks
    the current values again.  Writes into a state in place land in the stack.  The cache holds
    the states by weak reference (a dropped optimizer's states are not kept alive)."""
    if len(group) < 2:
        return None
    key = (names, tuple([id(v.param) for v in group]))
    columns = [[v.state[s] for v in group] for s in names]
    e = _stacks.get(key)
    if e is not None:
        refs, ptrs = e
        if all(
            all(r() is t for r, t in zip(rc, col)) and [t.data_ptr() for t in col] == pc
            for rc, pc, col in zip(refs, ptrs, columns)
        ):
            return [_stack_view(col[0], rows, cols) for col in columns]
    shape = group[0].data.shape
    for col in columns:
        t0 = col[0]
        if len({id(t) for t in col}) != len(col) or not all(
            type(t) is Tensor and t.dtype == t0.dtype and t.device == t0.device
            and t.shape == shape and t.is_contiguous() and not t.requires_grad
            for t in col
        ):  # fmt: skip
            return None
    made: list[tuple] = []

    def drop(_: Any) -> None:  # only this entry: an older one's states may go after it is made
        if made and _stacks.get(key) is made[0]:
            del _stacks[key]

    refs, ptrs = [], []
    for s, col in zip(names, columns):
        stack = torch.stack(col)  # the current values, copied once
        new = list(stack.unbind(0))
        for v, t in zip(group, new):
            v.state[s] = t
        refs.append([weakref.ref(t, drop) for t in new])
        ptrs.append([t.data_ptr() for t in new])
    made.append((refs, ptrs))
    _stacks[key] = made[0]
    return [_stack_view(group[0].state[s], rows, cols) for s in names]


def _stack_view(first: Tensor, rows: int, cols: int) -> Tensor:
    """The ``(rows, cols)`` stack whose first state tensor is ``first`` (it starts the stack's
    memory; the stack holds ``rows * cols`` elements), detached: no view base for a compiled
    call to guard on (same storage and version counter)."""
    return first.as_strided((rows, cols), (cols, 1), first.storage_offset()).detach()
