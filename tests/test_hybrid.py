"""Hybrid sharding (shard within a group, replicate across groups) equals single-process training.

World size 4 arranged as a 2 x 2 (replicate x shard) mesh on gloo, every case of the optimizer
table, in one spawn:

* ``distopt.shard(..., mesh=mesh)`` at stage 2 (every case) and stage 1 (a shape-aware case of
  every optimizer class):
  gradients reduce-scattered within the shard group, the local shard all-reduced across the
  replicate group, shape-aware statistics reduced over the shard group only;
* FSDP2's own HSDP (``fully_shard(model, mesh=mesh)``, DTensor placements
  ``(Replicate(), Shard(0))``) with the distopt optimizer on the DTensors (a shape-aware case of
  every optimizer class).

Statistics summed over the wrong mesh dimension change the numbers, so the comparison can fail:
the same spawn runs that negative control.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.dist import rank, run_distributed, world_size
from tests.optim_cases import CASES, sharding_cases
from tests.problems import UnevenModel, train_uneven, uneven_batch, uneven_loss

STEPS = 10
HYBRID_CASES = sharding_cases()


def _one_per_class(cases) -> list[str]:
    from tests.optim_cases import _class_key

    seen, out = set(), []
    for c in cases:
        if c.shape_aware and _class_key(c) not in seen:
            seen.add(_class_key(c))
            out.append(c.id)
    return out


# stage 1 and HSDP: one shape-aware case per optimizer class (stage 2 runs every case)
SHAPE_AWARE = _one_per_class(HYBRID_CASES)


@functools.cache
def _single(case_id: str) -> dict[str, torch.Tensor]:
    case = next(c for c in CASES if c.id == case_id)
    torch.manual_seed(0)
    model = UnevenModel(scalar_shape=(1,))
    opt = case.make(model.parameters())
    train_uneven(model, opt, STEPS)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    dev = (
        "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size() else "cpu"
    )
    return init_device_mesh(dev, (2, world_size() // 2), mesh_dim_names=("replicate", "shard"))


def _run_plan(plan: dict[str, list[str]], steps: int, mesh) -> dict:
    import distopt
    from tests.optim_cases import CASES as ALL

    by_id = {c.id: c for c in ALL}
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for mode, ids in plan.items():
        out[mode] = {}
        for cid in ids:
            torch.manual_seed(0)
            model = UnevenModel(scalar_shape=(1,))
            if mode == "hsdp":
                try:
                    from torch.distributed.fsdp import fully_shard
                except ImportError:  # older torch
                    from torch.distributed._composable.fsdp import fully_shard
                fully_shard(model, mesh=mesh)
                opt = by_id[cid].make(model.parameters())
                train_uneven(model, opt, steps, rank(), world_size())
                params = {n: p.full_tensor() for n, p in model.named_parameters()}
            else:
                opt = by_id[cid].make(model.parameters())
                smodel, opt = distopt.shard(model, opt, stage=int(mode[-1]), mesh=mesh)
                train_uneven(smodel, opt, steps, rank(), world_size())
                info = smodel.shard_info()
                assert info["world_size"] == 2 and info["replicas"] == 2, info
                params = dict(model.named_parameters())
            out[mode][cid] = {n: p.detach().cpu().clone() for n, p in params.items()}
    return out


def _bad_meshes(mesh) -> list[str]:
    """distopt.shard's answers to a mesh it cannot use (each must be a ValueError)."""
    from torch.distributed.device_mesh import init_device_mesh

    import distopt

    def attempt(**kw) -> str:
        model = UnevenModel(scalar_shape=(1,))
        opt = distopt.optim.AdamW(model.parameters())
        try:
            distopt.shard(model, opt, stage=2, **kw)
        except ValueError as exc:
            return str(exc)
        return "no error"

    odd = init_device_mesh("cpu", (2, world_size() // 2), mesh_dim_names=("dp", "tp"))
    return [
        attempt(mesh=odd),
        attempt(mesh=mesh, process_group=mesh.get_group("shard")),
        attempt(mesh="not a mesh"),
    ]


def _save_midway(ckpt_dir: str, mesh) -> dict:
    """Lamb under hybrid ZeRO-2 and under HSDP: 3 steps, distopt.checkpoint.save, 3 more."""
    import distopt
    import distopt.checkpoint

    out = {}
    for mode in ("zero2", "hsdp"):
        torch.manual_seed(0)
        model = UnevenModel(scalar_shape=(1,))
        if mode == "hsdp":
            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # older torch
                from torch.distributed._composable.fsdp import fully_shard
            fully_shard(model, mesh=mesh)
            trained, opt = model, distopt.optim.Lamb(model.parameters(), lr=1e-2)
        else:
            opt = distopt.optim.Lamb(model.parameters(), lr=1e-2)
            trained, opt = distopt.shard(model, opt, stage=2, mesh=mesh)
        _train_range(trained, opt, 0, 3)
        distopt.checkpoint.save(f"{ckpt_dir}/{mode}", model=trained, optimizer=opt)
        _train_range(trained, opt, 3, 6)
        params = {n: p.full_tensor() if mode == "hsdp" else p for n, p in model.named_parameters()}
        out[mode] = {n: p.detach().cpu().clone() for n, p in params.items()}
    return out


def _grad_sum(mesh) -> list[str]:
    """The gradient sum a mid-window checkpoint stores (``Backend.gather_grad_sum``) under
    hybrid ZeRO-2 equals the sum of every rank's local gradients; returns the mismatches."""
    import torch.distributed as dist

    import distopt
    from distopt.parallel import backend_for

    torch.manual_seed(0)
    plain = UnevenModel(scalar_shape=(1,))
    torch.manual_seed(0)
    model = UnevenModel(scalar_shape=(1,))
    smodel, _ = distopt.shard(model, distopt.optim.AdamW(model.parameters()), stage=2, mesh=mesh)
    img, tok, target = uneven_batch(0)
    n = img.shape[0] // world_size()
    sl = slice(rank() * n, (rank() + 1) * n)
    for m in (plain, smodel):
        uneven_loss(m, (img[sl], tok[sl], target[sl]), 0).backward()
    got = backend_for(smodel).gather_grad_sum()
    bad = []
    for name, p in plain.named_parameters():
        if p.grad is None:
            continue
        want = p.grad.clone()
        dist.all_reduce(want)
        if not torch.allclose(got[name].reshape(want.shape), want, rtol=1e-5, atol=1e-6):
            bad.append(
                f"{name}: max abs err {float((got[name].reshape(want.shape) - want).abs().max()):.3g}"
            )
    return bad


def _item_counts(mesh) -> list[str]:
    """GradientAccumulator under hybrid ZeRO-2 with a different item count on every rank (and
    so on every node): one SGD step (lr 1) equals the gradient of the summed loss over the
    global item count; returns the mismatches."""
    import distopt

    torch.manual_seed(0)
    plain = UnevenModel(scalar_shape=(1,))
    torch.manual_seed(0)
    model = UnevenModel(scalar_shape=(1,))
    smodel, opt = distopt.shard(
        model, distopt.optim.SGD(model.parameters(), lr=1.0), stage=2, mesh=mesh
    )
    acc = distopt.GradientAccumulator(smodel, steps=1)
    batch = uneven_batch(0)
    counts = [1, 2, 3, 4][: world_size()]  # rank r: items [sum(counts[:r]), + counts[r])

    def part(r):
        lo = sum(counts[:r])
        return tuple(x[lo : lo + counts[r]] for x in batch)

    with acc.accumulate(num_items=counts[rank()]):
        acc.backward(uneven_loss(smodel, part(rank()), 0) * counts[rank()])
    opt.step()
    for r in range(world_size()):  # the reference: every rank's summed loss over every item
        (uneven_loss(plain, part(r), 0) * counts[r] / sum(counts)).backward()
    bad = []
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        want = p.detach() - (p.grad if p.grad is not None else 0)
        if not torch.allclose(q.detach(), want, rtol=1e-5, atol=1e-6):
            bad.append(f"{name}: max abs err {float((q.detach() - want).abs().max()):.3g}")
    return bad


def _train_range(model, opt, start, stop, shard_rank=None, shard_world=None):
    r = rank() if shard_rank is None else shard_rank
    w = world_size() if shard_world is None else shard_world
    for t in range(start, stop):
        img, tok, target = uneven_batch(t)
        n = img.shape[0] // w
        sl = slice(r * n, (r + 1) * n)
        opt.zero_grad(set_to_none=True)
        uneven_loss(model, (img[sl], tok[sl], target[sl]), t).backward()
        opt.step()


def _hybrid_worker(
    plan: dict[str, list[str]], control: dict[str, list[str]], steps: int, ckpt_dir: str
):
    """``plan`` as it should run; then ``control`` with every all-reduce over the shard group
    (the optimizer's statistics) sent over the replicate group instead (the negative control;
    gradients travel by reduce-scatter / all-gather and replicate-group all-reduces, untouched)."""
    import torch.distributed as dist

    mesh = _mesh()
    out = {"plan": _run_plan(plan, steps, mesh), "errors": _bad_meshes(mesh)}
    out["resumed"] = _save_midway(ckpt_dir, mesh)
    out["grad_sum"] = _grad_sum(mesh)
    out["item_counts"] = _item_counts(mesh)
    shard_ranks = dist.get_process_group_ranks(mesh.get_group("shard"))
    wrong = mesh.get_group("replicate")
    right = dist.all_reduce

    def over_replicas(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if group is not None and dist.get_process_group_ranks(group) == shard_ranks:
            group = wrong
        return right(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = over_replicas
    try:
        out["control"] = _run_plan(control, steps, mesh)
    finally:
        dist.all_reduce = right
    return out


def _failures(per_rank, plan) -> list[str]:
    failures = []
    for mode, ids in plan.items():
        for cid in ids:
            expected = _single(cid)
            for r, res in enumerate(per_rank):
                for name, want in expected.items():
                    got = res[mode][cid][name]
                    if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                        err = float((got - want).abs().max())
                        failures.append(f"{mode} {cid} rank {r} {name}: max abs err {err:.3g}")
    return failures


@pytest.mark.distributed
def test_hybrid_matches_single_process_2x2(tmp_path):
    plan = {
        "zero2": [c.id for c in HYBRID_CASES],
        "zero1": SHAPE_AWARE,
        "hsdp": SHAPE_AWARE,
    }
    # negative control: Lamb's and Adafactor's statistics summed over the replicate group (the
    # other mesh dimension: twice this shard's rows, none of the other shard's) differ
    control = {"zero2": ["lamb", "adafactor"], "hsdp": ["lamb", "adafactor"]}
    per_rank = run_distributed(_hybrid_worker, 4, plan, control, STEPS, str(tmp_path), timeout=900)
    failures = _failures([r["plan"] for r in per_rank], plan)
    assert not failures, "hybrid 2x2:\n" + "\n".join(failures[:40])
    for r in per_rank:
        assert not r["grad_sum"], r["grad_sum"]
        assert not r["item_counts"], r["item_counts"]
        names, both, junk = r["errors"]
        assert "dim names ('replicate', 'shard')" in names and "('dp', 'tp')" in names, names
        assert "either mesh= or process_group=" in both, both
        assert "1-D or 2-D" in junk and "str" in junk, junk
    caught = _failures([r["control"] for r in per_rank], control)
    for mode, ids in control.items():
        for cid in ids:
            assert any(f.startswith(f"{mode} {cid} ") for f in caught), (mode, cid, caught)
    # checkpoints of hybrid ZeRO-2 and HSDP (rows split over the shard group, one copy per
    # replica) resume on one process: 3 steps there equal 3 more steps on the 2 x 2 mesh
    import distopt
    import distopt.checkpoint

    for mode in ("zero2", "hsdp"):
        torch.manual_seed(0)
        model = UnevenModel(scalar_shape=(1,))
        opt = distopt.optim.Lamb(model.parameters(), lr=1e-2)
        distopt.checkpoint.load(str(tmp_path / mode), model=model, optimizer=opt)
        _train_range(model, opt, 3, 6, 0, 1)
        for name, p in model.named_parameters():
            want = per_rank[0]["resumed"][mode][name]
            torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
