"""distopt._dtensor: DTensor recognised by isinstance against torch's class, on real DTensors."""

from __future__ import annotations

import torch

from tests.dist import run_distributed, world_size


def _check_helpers() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from distopt._dtensor import dtensor_type, is_dtensor, local_and_sharding, local_tensor

    out: dict = {"type_is_torch": dtensor_type() is DTensor}
    mesh = init_device_mesh("cpu", (world_size(),))
    full = torch.arange(12.0).reshape(4, 3)
    rows = distribute_tensor(full, mesh, [Shard(0)])
    rep = distribute_tensor(full, mesh, [Replicate()])
    cols = distribute_tensor(full, mesh, [Shard(1)])
    plain = torch.zeros(2)
    out["is"] = [is_dtensor(rows), is_dtensor(rep), is_dtensor(plain), is_dtensor(None)]
    out["local_plain_same"] = local_tensor(plain) is plain
    out["local_rows"] = local_tensor(rows).tolist()
    local, sharded, group = local_and_sharding(rows)
    out["rows"] = (local.tolist(), sharded, group is mesh.get_group())
    local, sharded, group = local_and_sharding(rep)
    out["rep"] = (local.tolist(), sharded, group)
    try:
        local_and_sharding(cols)
        out["cols"] = "no error"
    except NotImplementedError as exc:
        out["cols"] = str(exc)
    dist.barrier()
    return out


def test_dtensor_helpers_on_real_dtensors():
    res = run_distributed(_check_helpers, 2, timeout=120)
    full = torch.arange(12.0).reshape(4, 3)
    for r, out in enumerate(res):
        assert out["type_is_torch"]
        assert out["is"] == [True, True, False, False]
        assert out["local_plain_same"]
        mine = full[2 * r : 2 * r + 2].tolist()
        assert out["local_rows"] == mine
        assert out["rows"] == (mine, True, True)
        assert out["rep"] == (full.tolist(), False, None)
        assert "dim 0" in out["cols"]


def test_plain_tensors_are_not_dtensors():
    from distopt._dtensor import is_dtensor, local_tensor

    t = torch.ones(3)
    assert not is_dtensor(t) and local_tensor(t) is t
