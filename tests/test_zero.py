"""distopt.shard (ZeRO-1/ZeRO-2) equals single-process training, for every optimizer case.

One distributed run per (stage, world size) trains every case of the optimizer table for 20
steps on a model with uneven shapes and compares the final parameters with single-process
training on the concatenated batch.
"""

from __future__ import annotations

import functools

import pytest
import torch

import distopt
from tests.dist import rank, run_distributed, world_size
from tests.optim_cases import CASES, sharding_cases
from tests.problems import UnevenModel, train_uneven, uneven_batch, uneven_loss

STEPS = 20
ZERO_CASES = sharding_cases()


@functools.cache
def _single_by_id(case_id):
    return _single_uncached(next(c for c in CASES if c.id == case_id))


def _single(case):
    return _single_by_id(case.id)


def _single_uncached(case):
    torch.manual_seed(0)
    model = UnevenModel()
    opt = case.make(model.parameters())
    train_uneven(model, opt, STEPS)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero_worker(stage: int, case_ids: list[str], steps: int, bucket_mb: float = 25.0, break_reducer: bool = False):
    from tests.optim_cases import CASES as ALL

    by_id = {c.id: c for c in ALL}
    results = {}
    for cid in case_ids:
        case = by_id[cid]
        torch.manual_seed(0)
        model = UnevenModel()
        opt = case.make(model.parameters())
        smodel, opt = distopt.shard(model, opt, stage=stage, bucket_mb=bucket_mb)
        if break_reducer:  # negative control: per-shard statistics instead of global ones
            opt.set_reducer(lambda flat, group: None)
        train_uneven(smodel, opt, steps, rank(), world_size())
        results[cid] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_single_process(stage, world):
    ids = [c.id for c in ZERO_CASES]
    per_rank = run_distributed(_zero_worker, world, stage, ids, STEPS, timeout=600)
    failures = []
    for case in ZERO_CASES:
        expected = _single(case)
        for r, res in enumerate(per_rank):
            for name, want in expected.items():
                got = res[case.id][name]
                if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                    err = float((got - want).abs().max())
                    failures.append(f"{case.id} rank {r} {name}: max abs err {err:.3g}")
    assert not failures, f"stage {stage}, world {world}:\n" + "\n".join(failures[:40])


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_many_small_buckets(stage):
    """Buckets of ~500 bytes: many reduce-scatters/all-gathers per step, same result."""
    cases = [c for c in ZERO_CASES if c.id in ("adamw", "lamb")]
    per_rank = run_distributed(_zero_worker, 3, stage, [c.id for c in cases], STEPS, 0.0005, timeout=600)
    for case in cases:
        expected = _single(case)
        for res in per_rank:
            for name, want in expected.items():
                torch.testing.assert_close(res[case.id][name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_negative_control_without_reduction_differs():
    """Without the batched all-reduce, Lamb's trust ratios use shard norms and results differ:
    the equality checks above are able to fail."""
    case = next(c for c in ZERO_CASES if c.id == "lamb")
    per_rank = run_distributed(_zero_worker, 2, 1, [case.id], 5, 25.0, True, timeout=300)
    expected = _single_steps(case, 5)
    diffs = [float((per_rank[0][case.id][n] - w).abs().max()) for n, w in expected.items()]
    assert max(diffs) > 1e-4


def _single_steps(case, steps):
    torch.manual_seed(0)
    model = UnevenModel()
    opt = case.make(model.parameters())
    train_uneven(model, opt, steps)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _bf16_master_worker(stage: int):
    import distopt

    torch.manual_seed(0)
    model = UnevenModel().to(torch.bfloat16)
    opt = distopt.optim.Lamb(model.parameters(), lr=1e-2)
    smodel, opt = distopt.shard(model, opt, stage=stage, master_dtype=torch.float32)
    # the optimizer updates fp32 master rows, the model keeps bf16
    assert all(t.dtype == torch.float32 for g in opt.param_groups for t in g["params"])
    for t in range(5):
        img, tok, target = uneven_batch(t)
        n = img.shape[0] // world_size()
        sl = slice(rank() * n, (rank() + 1) * n)
        opt.zero_grad()
        loss = uneven_loss(smodel, (img[sl].bfloat16(), tok[sl], target[sl].bfloat16()), t)
        loss.backward()
        opt.step()
    masters = {id(p): p for g in opt.param_groups for p in g["params"]}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}, len(masters)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_params_with_fp32_master_rows(stage):
    res = run_distributed(_bf16_master_worker, 2, stage, timeout=300)
    (p0, _), (p1, _) = res
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"{name}: ranks disagree after all-gather"
        assert torch.isfinite(p0[name]).all()
    torch.manual_seed(0)
    init = {n: p.detach().bfloat16().float() for n, p in UnevenModel().named_parameters()}
    moved = [n for n in p0 if n != "frozen" and not torch.equal(p0[n], init[n])]
    assert len(moved) >= 6, moved


def _late_group_worker():
    import distopt

    torch.manual_seed(0)
    model = UnevenModel()
    ps = list(model.parameters())
    opt = distopt.optim.AdamW(ps[:-2])
    smodel, opt = distopt.shard(model, opt, stage=1)
    opt.add_param_group({"params": ps[-2:]})
    img, tok, target = uneven_batch(0)
    uneven_loss(smodel, (img[:6], tok[:6], target[:6]), 0).backward()
    try:
        opt.step()
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.distributed
def test_param_group_added_after_shard_is_refused():
    msgs = run_distributed(_late_group_worker, 2, timeout=300)
    assert all("added after distopt.shard" in m for m in msgs), msgs


def _moved_worker():
    import distopt

    torch.manual_seed(0)
    model = UnevenModel()
    opt = distopt.optim.Lamb(model.parameters(), lr=1e-2)
    smodel, opt = distopt.shard(model, opt, stage=2)
    smodel._apply(lambda t: t.clone())  # what .to()/.cuda() do: new storage for every parameter
    smodel.to("cpu")
    train_uneven(smodel, opt, 4, rank(), world_size())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.distributed
def test_module_to_after_shard_keeps_shards_bound():
    res = run_distributed(_moved_worker, 2, timeout=300)
    torch.manual_seed(0)
    model = UnevenModel()
    opt = distopt.optim.Lamb(model.parameters(), lr=1e-2)
    train_uneven(model, opt, 4)
    for r in res:
        for n, p in model.named_parameters():
            torch.testing.assert_close(r[n], p.detach(), rtol=1e-5, atol=1e-6)


def _paths_worker(case_ids: list[str], steps: int):
    """Both collective paths of the engine on this gloo group: all-to-alls (gloo's fast path)
    and reduce_scatter_tensor / all_gather_into_tensor (NCCL's), with the calls each issued."""
    import torch.distributed as dist

    from distopt.zero import _buffers

    names = ("reduce_scatter_tensor", "reduce_scatter_single", "all_gather_into_tensor", "all_gather_single",
             "all_to_all_single")  # fmt: skip
    calls: dict[str, int] = {}
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted

    for n, fn in originals.items():
        setattr(dist, n, wrap(n, fn))
    out = {}
    try:
        for a2a in (True, False):
            _buffers.GLOO_ALL_TO_ALL = a2a
            for stage in (1, 2):
                calls.clear()
                res = _zero_worker(stage, case_ids, steps, 0.0005)
                out[(a2a, stage)] = (res, dict(calls))
    finally:
        _buffers.GLOO_ALL_TO_ALL = True
        for n, fn in originals.items():
            setattr(dist, n, fn)
    return out


@pytest.mark.distributed
def test_zero_all_to_all_and_generic_collectives_agree():
    """On gloo the engine reduces and gathers with all-to-alls; the reduce-scatter/all-gather
    path (the one NCCL takes) is forced here too: both equal one-process training, and each
    path issues the collectives it claims (many small buckets, 3 ranks: uneven regions)."""
    cases = [c for c in ZERO_CASES if c.id in ("adamw", "lamb")]
    per_rank = run_distributed(_paths_worker, 3, [c.id for c in cases], 6, timeout=600)
    for r, res in enumerate(per_rank):
        for (a2a, stage), (got, calls) in res.items():
            rs = calls.get("reduce_scatter_tensor", 0) + calls.get("reduce_scatter_single", 0)
            ag = calls.get("all_gather_into_tensor", 0) + calls.get("all_gather_single", 0)
            if a2a:
                assert calls.get("all_to_all_single", 0) > 0 and rs == ag == 0, calls
            else:
                assert rs > 0 and ag > 0 and "all_to_all_single" not in calls, calls
            for case in cases:
                for name, want in _single_steps(case, 6).items():
                    torch.testing.assert_close(
                        got[case.id][name], want, rtol=1e-5, atol=1e-6,
                        msg=lambda m, r=r, a2a=a2a, stage=stage, name=name: f"rank {r} a2a={a2a} stage {stage} {name}: {m}",
                    )  # fmt: skip


def _alloc_worker(stage: int):
    """Bytes of every allocation of at least ``big`` bytes made during two steady-state steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(16)])  # 4 KiB weights
    opt = distopt.optim.AdamW(model.parameters(), lr=1e-2)
    smodel, opt = distopt.shard(model, opt, stage=stage)  # one bucket of ~68 KiB
    x = torch.randn(4, 32)

    def step():
        opt.zero_grad(set_to_none=True)
        smodel(x).pow(2).mean().backward()
        opt.step()

    for _ in range(3):
        step()
    big = 16 * 1024  # above any one gradient, activation or row shard; under half the bucket
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        step()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage >= big]
    return sizes, sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.distributed
def test_zero_steps_allocate_no_bucket_sized_buffers():
    """The flat communication buffers are allocated once and reused: two steady-state steps
    allocate nothing of bucket size (the engine used to allocate its flat buffers every step)."""
    for stage in (1, 2):
        for r, (sizes, model_bytes) in enumerate(run_distributed(_alloc_worker, 2, stage, timeout=300)):
            assert model_bytes > 4 * 16 * 1024, model_bytes  # the bucket really is bigger
            assert sizes == [], f"stage {stage} rank {r}: allocations of {sizes} bytes per 2 steps"
