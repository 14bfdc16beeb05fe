"""ZeRO-2 overlaps its gradient reduce-scatters with the rest of backward.

Each bucket's reduce-scatter is *launched* from the gradient hooks as soon as the bucket is
complete and waited only where the reduced rows are needed (the end-of-backward callback).
The test watches backward from the inside: when the first layer's gradient is computed (the
last thing backward does), the buckets of the later layers must already have been launched,
and their rows must not yet be in the shards (nobody waited for them inside the backward
hooks).  After backward every shard holds its rows, and training equals the one-process run
(the exactness of ZeRO-2 itself is ``tests/test_zero.py``'s).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distopt
from distopt.zero._engine import engine_of
from tests.dist import rank, run_distributed, world_size

LAYERS = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(LAYERS)])


def _batch(step: int, r: int, w: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(4 * w, 16, generator=g)
    return x[4 * r : 4 * (r + 1)]


def _overlap_worker(steps: int):
    model = _model()
    opt = distopt.optim.AdamW(model.parameters(), lr=1e-2)
    # ~1 KiB buckets: every layer's weight and bias are buckets of their own
    smodel, opt = distopt.shard(model, opt, stage=2, bucket_mb=0.001)
    engine = engine_of(model.parameters())
    shard_of = {id(p): shard for _, p, shard, _, _ in engine.managed()}
    last_w = model[-1].weight
    seen = []

    def at_first_layer(grad):
        # backward is computing layer 0's weight gradient: the later layers' buckets are done
        seen.append(
            (
                engine.stats.calls.get("reduce_scatter", 0) - calls_before[0],
                shard_of[id(last_w)].grad is None,
            )
        )
        return grad

    model[0].weight.register_hook(at_first_layer)
    calls_before = [0]
    for t in range(steps):
        calls_before[0] = engine.stats.calls.get("reduce_scatter", 0)
        opt.zero_grad(set_to_none=True)
        loss = smodel(_batch(t, rank(), world_size())).pow(2).mean()
        loss.backward()
        have_rows = all(shard_of[id(p)].grad is not None for p in model.parameters())
        seen.append(("after backward", have_rows))
        opt.step()
    return {"seen": seen, "params": [p.detach().clone() for p in model.parameters()]}


def _single(steps: int, w: int):
    model = _model()
    opt = distopt.optim.AdamW(model.parameters(), lr=1e-2)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        x = torch.cat([_batch(t, r, w) for r in range(w)])
        model(x).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.distributed
def test_zero2_reduce_scatters_overlap_backward():
    steps, w = 3, 2
    per_rank = run_distributed(_overlap_worker, w, steps, timeout=300)
    want = _single(steps, w)
    for r, res in enumerate(per_rank):
        inside = [s for s in res["seen"] if s[0] != "after backward"]
        after = [s for s in res["seen"] if s[0] == "after backward"]
        assert len(inside) == steps and len(after) == steps, res["seen"]
        for launched, last_layer_rows_missing in inside:
            # layers 1..5: 10 buckets launched before layer 0's gradient exists
            assert launched >= 2 * (LAYERS - 1), f"rank {r}: only {launched} launched: {res['seen']}"
            assert last_layer_rows_missing, f"rank {r}: rows applied inside backward: {res['seen']}"
        assert all(ok for _, ok in after), f"rank {r}: rows missing after backward: {res['seen']}"
        for got, exp in zip(res["params"], want):
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
