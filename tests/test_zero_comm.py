"""Measured (not computed) memory and communication of distopt ZeRO vs DDP.

The collectives each mode asks for are counted by wrapping ``torch.distributed`` in the rank
processes (DDP is routed through ``dist.all_reduce`` by torch's default comm hook); optimizer
state bytes are summed from the optimizers' state tensors.
"""

from __future__ import annotations

import pytest

from distopt.bench.zero import run


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_zero_state_and_traffic_vs_ddp(world):
    res = run(world, "adamw", ("ddp", "distopt-z1", "distopt-z2", "torch-zero"), rounds=1, steps=1, batch=2, seq=16)
    ddp = res["modes"]["ddp"]
    assert ddp["traffic_bytes"] > 0 and ddp["state_bytes"] > 0
    # every mode's CPU time per step is measured (positive, and at most the ranks' wall time
    # on their cores plus their communication threads': bounded by a generous factor)
    for mode, r in res["modes"].items():
        assert 0 < r["cpu_s"] < 20 * r["step_s"], (mode, r)
    for mode in ("distopt-z1", "distopt-z2"):
        r = res["modes"][mode]
        # state per rank <= 1.05 x total/N (row remainders and replicated step counters only)
        assert r["state_bytes"] <= 1.05 * ddp["state_bytes"] / world, (mode, r, ddp)
        # bytes sent per step (ring model of the requested collectives) <= 1.05 x DDP's
        assert r["traffic_bytes"] <= 1.05 * ddp["traffic_bytes"], (mode, r, ddp)
    # the peer really does send more (one broadcast per parameter): the counting can tell
    assert res["modes"]["torch-zero"]["traffic_bytes"] > 1.3 * ddp["traffic_bytes"]
