"""distopt.parallel: every backend through the one interface, and the injected reducer.

One 2-rank gloo spawn runs DDP, distopt ZeRO-1/2 and FSDP2 on the same tiny model and asks each
backend the same questions (checkpoint entries, gradient norm, local gradients, sync off / flush,
the mid-window gradient sum, the counted reducer); the answers are checked against one process
computing everything from the full batch.  The reducer tests run in this process.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distopt
from distopt.optim._core import ShardSpec
from distopt.parallel import Backend, backend_for
from tests.dist import rank, run_distributed, world_size

torch.set_num_threads(1)

MODES = ("ddp", "zero1", "zero2", "fsdp2")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _batch(r: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(4 * w, 4, generator=g), torch.randn(4 * w, 3, generator=g)
    return x[4 * r : 4 * (r + 1)], y[4 * r : 4 * (r + 1)]


def _loss(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _reference() -> dict:
    """One process: the gradient of the mean over ranks of each rank's mean loss."""
    model = _model()
    w = 2
    loss = sum(_loss(model, *_batch(r, w)) for r in range(w)) / w
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"grads": grads, "norm": torch.sqrt(sum((g * g).sum() for g in grads.values()))}


def _build(mode: str):
    raw = _model()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(raw)
        return model, distopt.optim.Lamb(model.parameters(), lr=1e-2), raw
    if mode in ("zero1", "zero2"):
        opt = distopt.optim.Lamb(raw.parameters(), lr=1e-2)
        model, opt = distopt.shard(raw, opt, stage=int(mode[-1]))
        return model, opt, raw
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(raw, mesh=init_device_mesh("cpu", (world_size(),)))
    return raw, distopt.optim.Lamb(raw.parameters(), lr=1e-2), raw


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker() -> dict:
    r, w = rank(), world_size()
    out: dict = {}
    for mode in MODES:
        model, opt, raw = _build(mode)
        backend = backend_for(model, opt)
        res: dict = {"kind": backend.kind, "world": backend.world, "name": backend.name}
        # checkpoint entries: FQNs, global shapes, rows per rank, the optimizer's tensors
        ents = backend.entries(opt)
        res["fqns"] = [e.fqn for e in ents]
        res["shapes"] = [tuple(e.shape) for e in ents]
        res["bounds"] = [e.bounds for e in ents]
        opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
        res["opt_tensors_are_optimizers"] = all(id(e.opt_tensor) in opt_ids for e in ents)
        res["local_rows"] = [
            (e.bounds[e.rank][1] - e.bounds[e.rank][0]) if e.bounds else None for e in ents
        ]
        res["opt_tensor_rows"] = [
            (e.opt_tensor.to_local() if hasattr(e.opt_tensor, "to_local") else e.opt_tensor).shape[
                0
            ]
            for e in ents
        ]
        # one synchronised backward: global norm and the local gradients clipping would scale
        x, y = _batch(r, w)
        with backend.context(True):
            _loss(model, x, y).backward()
        grads, norm = backend.grad_norm(
            [p for _, p in backend.named_params()]
            if mode.startswith("zero")
            else list(model.parameters())
        )
        res["norm"] = float(norm)
        res["n_local_grads"] = len(backend.local_grads())
        res["local_numel"] = sum(g.numel() for g in backend.local_grads())
        # the counted reducer: Lamb's trust ratios reduce over the shards' group
        before = backend.stats.calls["all_reduce"]
        opt.step()
        res["reductions_counted"] = backend.stats.calls["all_reduce"] - before
        opt.zero_grad(set_to_none=True)
        # sync off for one micro-batch, then the window's gradient sum and its flush
        with backend.context(False):
            _loss(model, x, y).backward()
        res["grad_sum"] = {n: t.clone() for n, t in backend.gather_grad_sum().items()}
        backend.sync_now()
        res["flushed"] = (
            {n: _full(p.grad).clone() for n, p in backend.named_params() if p.grad is not None}
            if mode in ("ddp", "fsdp2")
            else None
        )
        if mode.startswith("zero"):
            res["flushed_local_numel"] = sum(g.numel() for g in backend.local_grads())
        opt.zero_grad(set_to_none=True)
        out[mode] = res
    return out


def _ref_after_step() -> dict:
    """The reference gradients at the parameters after one Lamb step (for the window sum)."""
    model = _model()
    opt = distopt.optim.Lamb(model.parameters(), lr=1e-2)
    w = 2
    (sum(_loss(model, *_batch(r, w)) for r in range(w)) / w).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sums = {}
    for r in range(w):
        model.zero_grad(set_to_none=True)
        _loss(model, *_batch(r, w)).backward()
        for n, p in model.named_parameters():
            sums[n] = sums.get(n, 0) + p.grad.clone()
    return sums


@pytest.mark.distributed
def test_every_backend_answers_the_same_questions():
    per_rank = run_distributed(_worker, 2, timeout=600)
    ref = _reference()
    window = _ref_after_step()
    raw = _model()
    names = [n for n, _ in raw.named_parameters()]
    shapes = [tuple(p.shape) for _, p in raw.named_parameters()]
    numel = sum(p.numel() for p in raw.parameters())
    kinds = {"ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "fsdp2": "fsdp2"}
    for r, res in enumerate(per_rank):
        for mode in MODES:
            got = res[mode]
            where = f"rank {r} {mode}"
            assert got["kind"] == kinds[mode] and got["world"] == 2, (where, got["kind"])
            assert got["fqns"] == names and got["shapes"] == shapes, where
            assert got["opt_tensors_are_optimizers"], where
            if mode == "ddp":
                assert all(b is None for b in got["bounds"]), where
            else:  # rows of every parameter split over the two ranks, this rank's rows held
                for b, shape in zip(got["bounds"], shapes):
                    cut = sorted(tuple(x) for x in b)  # ZeRO balances which rank holds which rows
                    assert cut[0][0] == 0 and cut[-1][1] == shape[0] and cut[0][1] == cut[1][0], (
                        where,
                        b,
                    )
                assert got["local_rows"] == got["opt_tensor_rows"], where
            assert got["norm"] == pytest.approx(float(ref["norm"]), rel=1e-5), where
            if mode.startswith("zero") or mode == "fsdp2":
                assert got["local_numel"] < numel, (where, got["local_numel"])  # shards only
            else:
                assert got["local_numel"] == numel, where
            # Lamb's norms need a reduction exactly when the parameters are sharded
            assert (got["reductions_counted"] >= 1) == (mode != "ddp"), (
                where,
                got["reductions_counted"],
            )
            for n in names:
                torch.testing.assert_close(
                    got["grad_sum"][n], window[n], rtol=1e-5, atol=1e-6, msg=f"{where} {n}"
                )
            if got["flushed"] is not None:  # the flush averages the window over ranks
                for n in names:
                    torch.testing.assert_close(
                        got["flushed"][n], window[n] / 2, rtol=1e-5, atol=1e-6, msg=f"{where} {n}"
                    )
            else:
                assert 0 < got["flushed_local_numel"] < numel, where


# --------------------------------------------------------------------------- in one process


def test_single_process_backend():
    model = _model()
    backend = backend_for(model)
    assert type(backend) is Backend and backend.kind == "single" and backend.world == 1
    ents = backend.entries()
    assert [e.fqn for e in ents] == [n for n, _ in model.named_parameters()]
    assert all(e.bounds is None and e.opt_tensor is e.param for e in ents)
    _loss(model, *_batch(0, 1)).backward()
    grads, norm = backend.grad_norm(list(model.parameters()))
    want = torch.sqrt(sum((p.grad * p.grad).sum() for p in model.parameters()))
    assert float(norm) == pytest.approx(float(want)) and len(grads) == 4
    saved = backend.gather_grad_sum()
    model.zero_grad(set_to_none=True)
    backend.load_grad_sum(saved)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, saved[n])
    with pytest.raises(TypeError, match="must be an nn.Module"):
        backend_for(object())


def _sharded_lamb(groups):
    """Two parameters whose halves are declared shards over two different (fake) groups."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(6))
    opt = distopt.optim.Lamb([a, b], lr=1e-2)
    opt.set_sharding(
        {
            a: ShardSpec(torch.Size([8, 3]), 0, 4, groups[0]),
            b: ShardSpec(torch.Size([12]), 0, 6, groups[1]),
        }
    )
    a.grad, b.grad = torch.randn(4, 3), torch.randn(6)
    return opt


def test_injected_reducer_gets_one_call_per_process_group():
    calls = []

    def reducer(flat, group):
        calls.append((group, flat.numel()))
        flat.mul_(2.0)  # "the other rank holds the same numbers"

    g1, g2 = object(), object()
    opt = _sharded_lamb((g1, g2))
    opt.set_reducer(reducer)
    opt.step()
    groups = [g for g, _ in calls]
    assert g1 in groups and g2 in groups, calls
    assert all(g in (g1, g2) for g in groups), calls
    # a shared group: every statistic of a phase in one call
    calls.clear()
    opt = _sharded_lamb((g1, g1))
    opt.set_reducer(reducer)
    opt.step()
    assert calls and {g for g, _ in calls} == {g1}
    with pytest.raises(TypeError, match="callable"):
        opt.set_reducer(3)


def _one_step(reducer):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    if reducer is None:  # unsharded: no reduction at all
        distopt.optim.Lamb([p], lr=1e-1).step()
        return p.detach()
    opt = distopt.optim.Lamb([p], lr=1e-1)
    opt.set_sharding({p: ShardSpec(torch.Size([8, 3]), 0, 4, None)})
    opt.set_reducer(reducer)
    opt.step()
    return p.detach()


def test_injected_reducer_decides_the_numbers():
    """The maths uses what the injected reducer returns: a reducer that leaves the local sums
    gives the unsharded optimizer's numbers on the local rows; one that zeroes them does not."""
    unsharded = _one_step(None)
    torch.testing.assert_close(_one_step(lambda flat, group: None), unsharded)
    assert not torch.allclose(_one_step(lambda flat, group: flat.zero_()), unsharded)


def test_flat_partitions_refused_without_deepspeed_or_frames():
    """Param-group tensors replaced by flat 1-D partitions (what DeepSpeed's ZeRO wrapper does)
    are refused for whole-tensor maths, before anything changes; element-wise maths runs."""
    model = _model()
    opt = distopt.optim.Lamb(model.parameters(), lr=1e-2)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    before = flat.detach().clone()
    with pytest.raises(RuntimeError) as info:
        opt.step()
    for word in (
        "Lamb",
        "flat 1-D",
        "whole-tensor statistics",
        "distopt.shard",
        "No update was applied",
    ):
        assert word in str(info.value), str(info.value)
    assert torch.equal(flat.detach(), before) and not opt.state
    ew = distopt.optim.AdamW(model.parameters(), lr=1e-2)
    ew.param_groups[0]["params"] = [flat]
    ew.step()
    assert not torch.equal(flat.detach(), before)
    # the optimizer's own 1-D parameters (biases) are never mistaken for partitions, also after
    # a deep copy
    copied = copy.deepcopy(distopt.optim.Lamb(model.parameters(), lr=1e-2))
    for g in copied.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    copied.step()
