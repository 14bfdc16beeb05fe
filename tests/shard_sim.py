"""In-process simulation of dim-0 row sharding: N "ranks" as N threads of one process.

It proves the sharding invariants of the maths without processes or ``torch.distributed``:
each rank owns a dim-0 row slice of every parameter (possibly empty), has its own optimizer over
its local slices (told about them through ``set_sharding``), and steps in lock-step with the
others; the collective the optimizers ask for (``StepContext.reduce``) is injected into each
rank's optimizer with ``set_reducer``: a barrier-based sum over the simulated ranks.
The result assembled from the slices must equal the unsharded optimizer's.

Usage::

    sim = ShardedSim(make_optimizer, initial_tensors, world=3)
    for t in range(steps):
        sim.set_grads(global_grads)      # full gradients, sliced per rank (None: no grad)
        sim.step()
    params = sim.gather()                # full tensors
    state = sim.gather_state(i)          # full state of parameter i (replicated checked equal)

The reducer sums the ranks' flat buffers in rank order, so runs are deterministic whatever
the thread scheduling; mismatched buffer sizes or a rank that skips a reduction fail loudly
(the barrier times out or reports the mismatch) instead of hanging.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distopt.optim._core import ShardSpec

__all__ = ["ShardedSim", "ThreadReducer", "row_bounds"]


def row_bounds(rows: int, world: int, layout: str = "ceil", rotate: int = 0) -> list[tuple[int, int]]:
    """Per-rank ``[start, end)`` rows.

    ``"ceil"``: chunks of ``ceil(rows / world)`` rows in rank order (FSDP2's ``Shard(0)``; the
    last ranks may be empty).  ``"balanced"``: sizes differing by at most one, chunk ``j`` on
    rank ``(j + rotate) % world`` (distopt ZeRO's plan).
    """
    if layout == "ceil":
        c = -(-rows // world)
        return [(min(r * c, rows), min((r + 1) * c, rows)) for r in range(world)]
    if layout == "balanced":
        edges = [(j * rows) // world for j in range(world + 1)]
        out = [(0, 0)] * world
        for j in range(world):
            out[(j + rotate) % world] = (edges[j], edges[j + 1])
        return out
    raise ValueError(f"unknown layout {layout!r}")


def _rows_of(t: Tensor, start: int, end: int) -> Tensor:
    """Rows ``[start, end)`` of ``t`` (a 0-dim tensor counts as one row: a 1-D slice)."""
    return t.reshape(1)[start:end] if t.dim() == 0 else t[start:end]


class ThreadReducer:
    """Sum flat buffers across ``world`` threads, deterministically (rank order)."""

    def __init__(self, world: int, timeout: float = 60.0):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=timeout)
        self.slots: list[Tensor | None] = [None] * world
        self.calls = [0] * world

    def reduce(self, rank: int, flat: Tensor) -> None:
        self.slots[rank] = flat.detach().clone()
        self.calls[rank] += 1
        self.barrier.wait()
        sizes = {int(s.numel()) for s in self.slots}  # type: ignore[union-attr]
        total = None
        if len(sizes) == 1:
            total = self.slots[0].clone()  # type: ignore[union-attr]
            for s in self.slots[1:]:
                total += s  # type: ignore[operator]
        self.barrier.wait()  # every rank has read the slots before they are reused
        if total is None:
            raise AssertionError(f"ranks reduced buffers of different sizes: {sorted(sizes)}")
        flat.copy_(total)

    def abort(self) -> None:
        self.barrier.abort()


class ShardedSim:
    """N simulated ranks, each with an optimizer over its row slices (see the module docstring).

    ``make(params_or_groups)`` builds an optimizer; ``groups`` (lists of parameter indices)
    splits the parameters into param groups the same way on every rank.
    """

    def __init__(
        self,
        make: Callable[[Any], torch.optim.Optimizer],
        tensors: Sequence[Tensor],
        world: int,
        layout: str = "ceil",
        groups: Sequence[Sequence[int]] | None = None,
    ):
        self.world = world
        self.shapes = [t.shape for t in tensors]
        self.bounds = [
            row_bounds(1 if t.dim() == 0 else t.shape[0], world, layout, rotate=k)
            for k, t in enumerate(tensors)
        ]
        self.params: list[list[nn.Parameter]] = []
        self.opts: list[torch.optim.Optimizer] = []
        self.reducer = ThreadReducer(world)
        for r in range(world):
            local = [
                nn.Parameter(_rows_of(t.detach(), *self.bounds[k][r]).clone())
                for k, t in enumerate(tensors)
            ]
            arg: Any = local if groups is None else [{"params": [local[i] for i in g]} for g in groups]
            opt = make(arg)
            specs = {
                p: ShardSpec(shape=torch.Size(self.shapes[k]), row_start=self.bounds[k][r][0],
                             rows=self.bounds[k][r][1] - self.bounds[k][r][0])
                for k, p in enumerate(local)
            }
            opt.set_sharding(specs)
            opt.set_reducer(self._reducer_of(r))
            self.params.append(local)
            self.opts.append(opt)
        self.reductions_per_step: list[list[int]] = []  # per step: calls of each rank

    def _reducer_of(self, rank: int) -> Callable[[Tensor, Any], None]:
        def reduce(flat: Tensor, group: Any) -> None:
            self.reducer.reduce(rank, flat)

        return reduce

    # ------------------------------------------------------------------ driving
    def set_grads(self, grads: Sequence[Tensor | None]) -> None:
        """Give every rank its rows of the full gradients (None: the parameter has no grad)."""
        for r in range(self.world):
            for k, (p, g) in enumerate(zip(self.params[r], grads)):
                p.grad = None if g is None else _rows_of(g.detach(), *self.bounds[k][r]).clone()

    def step(self) -> None:
        """One optimizer step on every rank, in lock-step threads."""
        before = list(self.reducer.calls)
        errors: list[BaseException | None] = [None] * self.world

        def run(rank: int) -> None:
            try:
                self.opts[rank].step()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors[rank] = e
                self.reducer.abort()

        threads = [threading.Thread(target=run, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for e in errors:  # the first real error, not the BrokenBarrierError it caused elsewhere
            if e is not None and not isinstance(e, threading.BrokenBarrierError):
                raise e
        for e in errors:
            if e is not None:
                raise AssertionError("a rank did not reach a reduction the others made") from e
        self.reductions_per_step.append([a - b for a, b in zip(self.reducer.calls, before)])

    # ------------------------------------------------------------------ results
    def gather(self) -> list[Tensor]:
        """The full parameters, assembled from the ranks' slices."""
        out = []
        for k, shape in enumerate(self.shapes):
            order = sorted(range(self.world), key=lambda r: self.bounds[k][r][0])
            full = torch.cat([self.params[r][k].detach().reshape(-1, *shape[1:]) for r in order])
            out.append(full.reshape(shape))
        return out

    def gather_state(self, k: int) -> dict[str, Any]:
        """The full optimizer state of parameter ``k``.

        Row-sharded tensors (per the optimizer's ``state_is_sharded``) are concatenated in row
        order; replicated tensors and other values must be equal on every rank that has them.
        A 0-dim parameter's >= 1-D state (one element on one rank) is concatenated too.
        """
        shape = torch.Size(self.shapes[k])
        states = [self.opts[r].state.get(self.params[r][k], {}) for r in range(self.world)]
        names = set().union(*[s.keys() for s in states])
        order = sorted(range(self.world), key=lambda r: self.bounds[k][r][0])
        out: dict[str, Any] = {}
        for name in sorted(names):
            vals = {r: states[r][name] for r in range(self.world) if name in states[r]}
            if len(vals) != self.world:
                raise AssertionError(f"state {name!r} of parameter {k} exists on ranks {sorted(vals)} only")
            v0 = vals[order[0]]
            split = isinstance(v0, Tensor) and (
                self.opts[0].state_is_sharded(name, v0, shape) or (len(shape) == 0 and v0.dim() > 0)
            )
            if split:
                out[name] = torch.cat([vals[r].reshape(-1, *vals[r].shape[1:]) for r in order])
                if len(shape) == 0:
                    out[name] = out[name].reshape(())
                continue
            for r, v in vals.items():
                same = torch.equal(v, v0) if isinstance(v, Tensor) else v == v0
                if not same:
                    raise AssertionError(
                        f"replicated state {name!r} of parameter {k} differs between ranks "
                        f"{order[0]} and {r}: {v0} vs {v}"
                    )
            out[name] = v0
        return out
