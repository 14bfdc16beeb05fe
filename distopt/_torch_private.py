"""The private torch APIs distopt uses, in one place, each behind a check that it still exists.

torch offers no public way to run code once at the end of a backward pass (DDP, FSDP and
FSDP2 all use the autograd engine's ``queue_callback``), to tell that a tensor was written in
place since a given moment (the version counter that autograd's saved-tensor checks use), to make
FSDP2 reduce its accumulated gradients outside a backward pass, to build a ``ShardedTensor``
of uneven row shards from metadata every rank already has (without a collective per tensor), or
to compile a graph with inductor from a ``torch.compile`` backend of one's own (the optimizer
kernels note the compiled graph so that repeated calls skip dynamo's frame evaluation), or to
call an inductor-compiled graph's generated code without the wrappers around it (which cost
~100 us a call on caches a kernel has just flushed).
Everything else in distopt uses public torch APIs.  ``tests/test_private_apis.py`` fails loudly
when a torch release removes or changes one of these (see docs/architecture.md, "Private APIs").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "fsdp2_reduce_now",
    "compiled_fx_graph",
    "inductor_compiler",
    "watch_generated_call",
    "queue_end_of_backward",
    "sharded_tensor_from_metadata",
    "version_of",
]


def _engine() -> object:
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    if engine is None or not hasattr(engine, "queue_callback"):
        raise RuntimeError(
            f"distopt: torch {torch.__version__} has no autograd-engine queue_callback, which "
            "distopt's ZeRO needs to reduce gradients at the end of backward; please report this "
            "with your torch version"
        )
    return engine


def queue_end_of_backward(fn: Callable[[], None]) -> None:
    """Run ``fn`` once when the backward pass now executing has finished.

    Must be called from inside a backward pass (a tensor or post-accumulate-grad hook).
    """
    _engine().queue_callback(fn)  # type: ignore[attr-defined]


def version_of(t: Tensor) -> int:
    """The in-place version counter of ``t`` (bumped by every in-place write, views included)."""
    return int(t._version)


def fsdp2_reduce_now(module: object) -> None:
    """Reduce-scatter the unsharded gradients an FSDP2 root module holds, outside backward.

    FSDP2 has no public "reduce the accumulated gradients now"; its end-of-backward callback
    (``FSDPState._root_post_backward_final_callback``) does exactly that for every parameter
    group that holds unsharded gradients (an accumulation window flushed early).
    """
    get_state = getattr(module, "_get_fsdp_state", None)
    state = get_state() if get_state is not None else None
    callback = getattr(state, "_root_post_backward_final_callback", None)
    if callback is None:
        raise RuntimeError(
            f"GradientAccumulator.flush: torch {torch.__version__}'s FSDP2 cannot reduce gradients "
            "outside a backward pass; end every window with a full set of micro-batches"
        )
    callback()


def sharded_tensor_from_metadata(
    local_shards: list, global_metadata: object, process_group: object = None
) -> object:
    """A ``ShardedTensor`` from this rank's shards and the complete global metadata.

    The public ``ShardedTensor`` constructors either all-gather every rank's shard metadata (a
    collective per tensor, in a checkpoint of hundreds of tensors) or only build even
    ``ChunkShardingSpec`` layouts; distopt's row shards are uneven and every rank already knows
    all of them, which ``ShardedTensor._init_from_local_shards_and_global_metadata`` takes as is.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.distributed._shard announces its deprecation
        from torch.distributed._shard.sharded_tensor import ShardedTensor

    fn = getattr(ShardedTensor, "_init_from_local_shards_and_global_metadata", None)
    if fn is None:
        raise RuntimeError(
            f"distopt.checkpoint: torch {torch.__version__} has no "
            "ShardedTensor._init_from_local_shards_and_global_metadata, which distopt uses to save "
            "uneven row shards without a collective; please report this with your torch version"
        )
    return fn(local_shards, global_metadata, process_group=process_group)


def inductor_compiler(options: dict | None) -> Callable[[object, list], Callable] | None:
    """A ``torch.compile`` backend function ``(graph_module, example_inputs) -> compiled`` that
    compiles with inductor under the config patches ``options`` (what ``backend="inductor",
    options=options`` does), or ``None`` where this torch has no
    ``torch._inductor.compile_fx.compile_fx`` taking ``config_patches`` (the caller then uses
    plain ``torch.compile(backend="inductor")``).

    torch has no public entry to inductor for a backend of one's own; ``distopt.optim._kernel``
    needs one to keep the compiled graph it then calls directly (see ``_kernel.Compiled``).
    """
    try:
        import inspect

        from torch._inductor.compile_fx import compile_fx
    except ImportError:
        return None
    if "config_patches" not in inspect.signature(compile_fx).parameters:
        return None
    patches = dict(options or {})

    def compile_inductor(gm: object, example_inputs: list) -> Callable:
        return compile_fx(gm, example_inputs, config_patches=patches)

    return compile_inductor


def compiled_fx_graph(compiled: object) -> object | None:
    """The ``CompiledFxGraph`` (inductor's output) inside the wrappers ``compile_fx`` returned
    (AOT autograd's forward, its runtime wrapper), found through ``__wrapped__``, ``compiled_fn``
    and closure cells; ``None`` where there is none (another torch, another shape of wrappers)."""
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:
        return None
    stack, seen = [compiled], set()
    while stack and len(seen) < 64:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, CompiledFxGraph):
            ok = callable(getattr(obj, "current_callable", None)) and getattr(obj, "_boxed_call", False)
            return obj if ok else None
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value) and not isinstance(value, type):
                stack.append(value)
        for name in ("__wrapped__", "compiled_fn"):
            value = getattr(obj, name, None)
            if value is not None and callable(value):
                stack.append(value)
    return None


@contextlib.contextmanager
def watch_generated_call(fx: object, seen: list) -> Iterator[Callable[[list], Any]]:
    """Watch the calls of the inductor output ``fx`` (see :func:`compiled_fx_graph`) reach its
    generated code; yields that code's boxed ``call(args: list) -> outputs``.

    Within the ``with`` block, each call appends to ``seen`` the argument list the generated
    ``call`` got and then what it returned.  A caller that finds both to be the very objects it
    passed to the wrappers and got back from them knows that the wrappers (AOT autograd's
    runtime wrapper, ``CompiledFxGraph.__call__``: input mutations written back, aliased outputs
    regenerated, profiler and metrics records) did nothing for that graph, and may call the
    generated ``call`` directly with a fresh list of the same arguments (it clears the list).
    No public API reaches it.
    """
    original = fx.current_callable  # type: ignore[attr-defined]

    def watched(args: list) -> Any:
        seen.append(list(args))
        out = original(args)
        seen.append(out)
        return out

    fx.current_callable = watched  # type: ignore[attr-defined]
    try:
        yield original
    finally:
        fx.current_callable = original  # type: ignore[attr-defined]
