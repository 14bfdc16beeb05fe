"""distopt optimizers on FSDP2 (``fully_shard``, DTensor parameters) equal single-process training.

The optimizer sees DTensor parameters sharded on dim 0; it works on the local shards and sums
shape-aware statistics across the mesh in one batched all-reduce per phase (no DTensor implicit
reductions on the hot path).
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.dist import rank, run_distributed, world_size
from tests.optim_cases import CASES, sharding_cases
from tests.problems import UnevenModel, train_uneven

STEPS = 20
FSDP_CASES = sharding_cases()


def _fully_shard(model):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # older torch
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    dev = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size() else "cpu"
    mesh = init_device_mesh(dev, (world_size(),))
    fully_shard(model, mesh=mesh)
    return model


@functools.cache
def _single(case_id):
    case = next(c for c in CASES if c.id == case_id)
    torch.manual_seed(0)
    model = UnevenModel(scalar_shape=(1,))
    opt = case.make(model.parameters())
    train_uneven(model, opt, STEPS)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _fsdp_worker(case_ids, steps):
    from tests.optim_cases import CASES as ALL

    by_id = {c.id: c for c in ALL}
    out = {}
    for cid in case_ids:
        torch.manual_seed(0)
        model = _fully_shard(UnevenModel(scalar_shape=(1,)))
        opt = by_id[cid].make(model.parameters())
        train_uneven(model, opt, steps, rank(), world_size())
        out[cid] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3, 4])
def test_fsdp2_matches_single_process(world):
    ids = [c.id for c in FSDP_CASES]
    per_rank = run_distributed(_fsdp_worker, world, ids, STEPS, timeout=900)
    failures = []
    for cid in ids:
        expected = _single(cid)
        for r, res in enumerate(per_rank):
            for name, want in expected.items():
                got = res[cid][name]
                if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                    failures.append(f"{cid} rank {r} {name}: max abs err {float((got - want).abs().max()):.3g}")
    assert not failures, f"FSDP2 world {world}:\n" + "\n".join(failures[:40])
