"""The sharding invariants of the maths, proven in one process (no torch.distributed).

For every case of the optimizer table: split each parameter of ``tests.problems.make_params``
into dim-0 row slices over N simulated ranks (some slices empty, the 0-dim parameter on one rank
only), step an optimizer per rank in lock-step threads whose reductions are summed across the
simulated ranks (``tests/shard_sim.py``), and check that the assembled parameters and optimizer
state equal the unsharded optimizer's (fp32, 1e-5).  Replicated state must be identical on
every rank, and every rank must make the same reductions.
"""

from __future__ import annotations

import pytest
import torch

from tests.optim_cases import CASES
from tests.problems import make_params, quadratic_loss
from tests.shard_sim import ShardedSim, row_bounds

IDS = [c.id for c in CASES]
STEPS = 6

# (world, layout, groups, skip): uneven FSDP2-style chunks with empty ranks; ZeRO's balanced and
# rotated chunks with two param groups and a parameter that never has a gradient.
SETUPS = [
    pytest.param(2, "ceil", None, (), id="w2-ceil"),
    pytest.param(3, "ceil", None, (), id="w3-ceil"),
    pytest.param(4, "balanced", [[0, 1, 2], [3, 4, 5]], (1,), id="w4-balanced-2groups-frozen"),
]

# Reductions per param group and step of the shape-aware families (one per phase).
_PHASES = {"adafactor": (2, 3), "adamp": (1, 2), "sgdp": (1, 2), "lars": (0, 1), "novograd": (1, 1)}


def _grads(params, t, skip):
    live = [p for i, p in enumerate(params) if i not in skip]
    loss = quadratic_loss(live, t)
    gs = torch.autograd.grad(loss, live)
    it = iter(gs)
    return [None if i in skip else next(it) for i in range(len(params))]


def _unsharded(case, groups, skip):
    params = make_params()
    arg = params if groups is None else [{"params": [params[i] for i in g]} for g in groups]
    opt = case.make(arg)
    for t in range(STEPS):
        for p, g in zip(params, _grads(params, t, skip)):
            p.grad = g
        opt.step()
    return params, opt


def _sharded(case, world, layout, groups, skip):
    init = [p.detach() for p in make_params()]
    try:
        sim = ShardedSim(case.make, init, world, layout=layout, groups=groups)
    except TypeError as e:  # e.g. a wrapper around a torch.optim optimizer
        pytest.skip(f"not sharding-aware: {e}")
    for t in range(STEPS):
        full = [torch.nn.Parameter(x.clone()) for x in sim.gather()]
        sim.set_grads(_grads(full, t, skip))
        sim.step()
    return sim


def _compare_state(name, a, b, what):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(b.float().reshape(a.shape), a.float(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{what} state {name!r}: {m}")
    else:
        assert a == pytest.approx(b, rel=1e-6), f"{what} state {name!r}: {a} vs {b}"


@pytest.mark.parametrize("world,layout,groups,skip", SETUPS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sharded_equals_unsharded(case, world, layout, groups, skip):
    if case.create_graph:
        pytest.skip("needs second-order gradients of the local shards")
    if case.extra.get("whole_tensor"):
        pytest.skip("moves whole tensors to owner ranks (all_to_all): covered by the multi-process tests")
    ref_params, ref_opt = _unsharded(case, groups, skip)
    if not hasattr(ref_opt, "set_sharding"):
        pytest.skip(f"{type(ref_opt).__name__} is not sharding-aware")
    sim = _sharded(case, world, layout, groups, skip)

    for k, (a, b) in enumerate(zip(ref_params, sim.gather())):
        torch.testing.assert_close(b, a.detach(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, k=k: f"{case.id}: parameter {k} differs: {m}")
    for k, p in enumerate(ref_params):
        ref_state = ref_opt.state.get(p, {})
        got = sim.gather_state(k)
        assert set(got) == set(ref_state), f"{case.id}: state names of parameter {k} differ"
        for name, value in ref_state.items():
            _compare_state(name, value, got[name], f"{case.id}: parameter {k}")

    # every rank made the same reductions (the barrier enforces it); shape-aware optimizers
    # made at least one per step, element-wise ones none, and at most one per phase and group
    calls = sim.reductions_per_step
    assert all(len(set(step)) == 1 for step in calls)
    per_step = [step[0] for step in calls]
    if not case.shape_aware:
        assert per_step == [0] * STEPS, f"{case.id}: an element-wise optimizer reduced {per_step}"
    else:
        first = case.extra.get("first_update_step", 0)  # e.g. ADOPT: step 1 only initialises v
        assert all(n >= 1 for n in per_step[first:]), f"{case.id}: a shape-aware step made no reduction: {per_step}"
    if case.family in _PHASES:
        n_groups = 1 if groups is None else len(groups)
        assert max(per_step) <= _PHASES[case.family][1] * n_groups, per_step


def test_row_bounds_cover_every_row():
    for rows in (0, 1, 4, 7, 13, 30):
        for world in (1, 2, 3, 4):
            for layout in ("ceil", "balanced"):
                b = sorted(row_bounds(rows, world, layout, rotate=rows))
                assert b[0][0] == 0 and b[-1][1] == rows
                assert all(b[i][1] == b[i + 1][0] for i in range(world - 1))
