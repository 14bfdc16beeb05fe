"""Count the bytes of every collective asked for at the ``torch.distributed`` API.

``counting()`` wraps the module-level collectives of ``torch.distributed`` in this process
(DDP's reducer is routed through them by registering torch's default all-reduce comm hook), so
DDP, ``ZeroRedundancyOptimizer``, FSDP2, DeepSpeed and distopt are all measured the same way:
by what they request, not by a formula.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
from collections.abc import Iterator

import torch.distributed as dist

from distopt.parallel import CommStats

# name -> (kind, which argument holds the buffer whose size counts)
_WRAP = {
    "all_reduce": ("all_reduce", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 1),
    "reduce_scatter_single": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "all_gather_into_tensor": ("all_gather", 0),
    "all_gather_single": ("all_gather", 0),
    "_all_gather_base": ("all_gather", 0),
    "broadcast": ("broadcast", 0),
    "all_to_all_single": ("all_to_all", 1),  # the input: what this rank sends (Muon's owner moves)
}


class CollectiveCounter(CommStats):
    """distopt's one byte counter (:class:`~distopt.parallel.CommStats`), filled by wrapping the
    ``torch.distributed`` API while :func:`counting` is active."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False


@contextlib.contextmanager
def counting() -> Iterator[CollectiveCounter]:
    counter = CollectiveCounter()
    originals = {}
    for name, (kind, pos) in _WRAP.items():
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        originals[name] = fn
        try:
            arg_name = list(inspect.signature(fn).parameters)[pos]
        except (TypeError, ValueError, IndexError):
            arg_name = None

        def wrapper(*args, _fn=fn, _kind=kind, _pos=pos, _arg=arg_name, **kwargs):
            if counter.active:
                t = args[_pos] if len(args) > _pos else kwargs[_arg]
                counter.add(_kind, t.numel() * t.element_size())
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapper)
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def close_group() -> None:
    """End a benchmark worker's process group without a teardown race.

    Objects that still hold the group (DDP reducers, sharded engines, their cycles) are
    collected first, while the interpreter is fully alive: left to interpreter shutdown, gloo's
    worker threads and the tensors of their finished work are destroyed in no fixed order, and a
    rank now and then aborts with "terminate called without an active exception".  The barrier
    lets every rank finish its last collective before any rank closes its connections.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
