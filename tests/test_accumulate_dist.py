"""GradientAccumulator under DDP, distopt ZeRO-1/ZeRO-2, FSDP2 and DeepSpeed on gloo.

For every mode and world size (1, 2, 4) ONE ``run_distributed`` call per world size runs every
mode, k in {1, 3, 4} and every case inside the ranks (spawning costs seconds on a 2-core machine);
the parent compares the parameters with single-process SGD on the concatenated batches:

* ``items``: loss = SUM over tokens, token counts differ between micro-batches and ranks (0 on
  some, a whole window of 0 on rank 1), two full windows and a window cut short by ``flush()``,
  plain and tensor ``num_items``; SGD with momentum, so windows must not leak into each other;
* ``mean``: per-micro-batch mean losses (``num_items=None``), mean-of-means convention, flushed
  short window;
* ``resume``: ``state_dict()`` in the middle of the second window, a fresh model, optimizer and
  accumulator load it and finish the window (and in ``items`` a mid-window ``state_dict()`` of
  the running accumulator must not disturb it);
* ``handoff`` (world 2, k=4): a mid-window state saved under DDP / ZeRO-1 / FSDP2 is finished by
  one plain process in the parent (another world size and mode);
* collectives counted per micro-batch: nothing at all off the boundary under DDP (wrapped
  ``torch.distributed`` functions + a counting DDP comm hook), ZeRO-1 and (deferred) ZeRO-2;
  FSDP2 does not reduce-scatter off the boundary; ZeRO-2 and FSDP2 with
  ``reduce_every_micro_batch`` reduce-scatter every micro-batch.

DeepSpeed runs in its own call (world 1, 2, 4) when ``deepspeed`` imports, else it is skipped.
"""

from __future__ import annotations

import functools
import os
import traceback
import zlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distopt
from distopt.optim import SGD
from tests.dist import rank, run_distributed, world_size

VOCAB = 7
KS = (1, 3, 4)
MODES = ("ddp", "zero1", "zero2", "zero2_every", "fsdp2", "fsdp2_every")
LR = 0.5
RTOL, ATOL = 1e-5, 1e-6


class TokenModel(nn.Module):
    """Embedding (11 rows: uneven for 2 and 4 ranks), a (1,) scale, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.scale = nn.Parameter(torch.ones(1))
        self.head = nn.Linear(6, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x) * self.scale))


def make_model() -> TokenModel:
    torch.manual_seed(0)
    return TokenModel()


def batch(case: str, k: int, window: int, micro: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and targets of one micro-batch of rank ``r``; lengths differ everywhere."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((case, k, window, micro, r)).encode()))
    if case == "mean":
        n = int(torch.randint(1, 7, (), generator=g))
    elif case == "items" and window == 0 and r == 1:
        n = 0  # rank 1 has no items in the whole first window
    elif micro == 0 and r == 0:
        n = int(torch.randint(1, 7, (), generator=g))  # every window has items
    else:
        n = int(torch.randint(0, 7, (), generator=g))  # 0 allowed
    return torch.randint(0, 11, (n,), generator=g), torch.randint(0, VOCAB, (n,), generator=g)


def windows(case: str, k: int) -> list[int]:
    """Micro-batches per window; a last window shorter than k is closed by flush()."""
    if case == "items":
        return [k, k] + ([k - 1] if k > 1 else [])
    if case == "mean":
        return [k] + ([1] if k > 1 else [])
    return [k, k]  # resume


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: bool) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="mean" if mean else "sum")


# --------------------------------------------------------------------------- reference


def reference(case: str, k: int, world: int, momentum: float, clip: float = 0.0) -> dict[str, torch.Tensor]:
    """One SGD step per window on the concatenation of all its micro-batches of all ranks
    (gradients clipped to global norm ``clip`` when it is > 0)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    for w, m in enumerate(windows(case, k)):
        opt.zero_grad()
        parts = [batch(case, k, w, i, r) for i in range(m) for r in range(world)]
        if case == "mean":
            loss = sum(loss_of(model, x, y, True) for x, y in parts) / len(parts)
        else:
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            loss = loss_of(model, x, y, False) / len(y)
        loss.backward()
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            CLIPPED.append(bool(norm > clip))
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


CLIPPED: list[bool] = []  # whether the clip was active, per reference window


# --------------------------------------------------------------------------- children


class CommCounter:
    """Counts the collectives asked for at the torch.distributed API (and distopt's aliases)."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_into_tensor",
             "all_gather_single", "broadcast", "all_gather", "reduce_scatter", "all_to_all_single",
             "reduce", "gather", "scatter")

    def __init__(self) -> None:
        import torch.distributed as dist

        # distopt looks the collectives up at call time, so wrapping the public
        # torch.distributed functions counts distopt's ZeRO, accumulator and optimizer alike;
        # distopt ZeRO's own collectives are read from its backend's CommStats (``watch``)
        self.calls: Counter = Counter()
        self.watched: list = []
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    def ddp_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.calls["ddp_hook"] += 1
        return allreduce_hook(state, bucket)

    def watch(self, stats) -> None:
        """Also report the ZeRO collectives counted in ``stats`` (a distopt CommStats)."""
        self.watched.append(stats)

    def snapshot(self) -> Counter:
        out = Counter(self.calls)
        for stats in self.watched:
            out["reduce_scatter_tensor"] += stats.calls["reduce_scatter"]
            out["all_gather_into_tensor"] += stats.calls["all_gather"]
        return +out


@functools.cache
def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size(),))


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh()
    fully_shard(model.emb, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build(mode: str, momentum: float, counter: CommCounter | None, k: int, state: dict | None = None,
          params: dict | None = None):
    """(model to call, optimizer, accumulator, plain module with the parameters)."""
    model = make_model()
    if params is not None:
        model.load_state_dict(params)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        opt = SGD(model.parameters(), lr=LR, momentum=momentum)
        wrapped = DDP(model)
        if counter is not None:
            wrapped.register_comm_hook(None, counter.ddp_hook)
    elif mode.startswith("zero"):
        opt = SGD(model.parameters(), lr=LR, momentum=momentum)
        wrapped, opt = distopt.shard(model, opt, stage=1 if mode == "zero1" else 2)
        if counter is not None:
            from distopt.parallel import backend_for

            counter.watch(backend_for(wrapped).stats)
    elif mode.startswith("fsdp2"):
        wrapped = _fully_shard(model)
        opt = SGD(model.parameters(), lr=LR, momentum=momentum)
    else:
        raise ValueError(mode)
    acc = distopt.GradientAccumulator(wrapped, steps=k, reduce_every_micro_batch=mode.endswith("_every"))
    if state is not None:
        acc.load_state_dict(state)
    return wrapped, opt, acc, model


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if type(p).__name__ == "DTensor" else p
        out[n] = t.detach().clone()
    return out


def micro_batch(acc, model, case, k, w, i, use_tensor_items=False):
    x, y = batch(case, k, w, i, rank())
    mean = case == "mean"
    n = None if mean else (torch.tensor(len(y)) if use_tensor_items else len(y))
    with acc.accumulate(num_items=n):
        acc.backward(loss_of(model, x, y, mean))


def run_case(mode: str, case: str, k: int, counter: CommCounter | None) -> dict:
    momentum = 0.0 if case == "resume" else 0.9
    model, opt, acc, plain = build(mode, momentum, counter, k)
    log = []  # per micro-batch: (boundary, calls during the block)
    wins = windows(case, k)
    resume_at = (1, k // 2) if case == "resume" else None
    for w, m in enumerate(wins):
        for i in range(m):
            if (w, i) == resume_at:
                state = acc.state_dict()
                params = {n: t for n, t in full_params(plain).items()}
                model, opt, acc, plain = build(mode, momentum, None, k, state, params)
            if case == "items" and k > 2 and (w, i) == (0, 2):
                acc.state_dict()  # a mid-window checkpoint must not disturb the window
            before = counter.snapshot() if counter else Counter()
            micro_batch(acc, model, case, k, w, i, use_tensor_items=i % 2 == 1)
            after = counter.snapshot() if counter else Counter()
            log.append((acc.sync_gradients, dict(after - before)))
            if acc.sync_gradients:
                opt.step()
                opt.zero_grad(set_to_none=True)
        if m < k:
            assert not acc.sync_gradients
            assert acc.flush()
            assert acc.sync_gradients
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert not acc.flush()  # nothing pending
    assert acc.optimizer_steps == len(wins)
    return {"params": full_params(plain), "log": log}


def handoff_state(mode: str) -> dict:
    """k=4 window, 2 micro-batches on every rank, then the state (for the parent to finish)."""
    model, opt, acc, plain = build(mode, 0.0, None, 4)
    for i in range(2):
        micro_batch(acc, model, "items", 4, 0, i)
    return {"state": acc.state_dict(), "params": full_params(plain)}


def _worker(modes: tuple[str, ...], ks: tuple[int, ...], handoff: bool) -> dict:
    counter = CommCounter()
    out: dict = {}
    for mode in modes:
        try:
            res = {}
            for k in ks:
                for case in ("items", "mean", "resume"):
                    res[(case, k)] = run_case(mode, case, k, counter)
            if handoff and mode in ("ddp", "zero1", "fsdp2"):
                res["handoff"] = handoff_state(mode)
            out[mode] = res
        except Exception:
            out[mode] = {"error": traceback.format_exc()}
    return out


@functools.cache
def _results(world: int) -> list[dict]:
    return run_distributed(_worker, world, MODES, KS, world == 2, timeout=900)


@functools.cache
def _reference(case: str, k: int, world: int, clip: float = 0.0) -> dict[str, torch.Tensor]:
    return reference(case, k, world, 0.0 if case == "resume" else 0.9, clip)


# --------------------------------------------------------------------------- tests


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_matches_one_step_on_concatenated_batch(world, mode):
    per_rank = _results(world)
    failures = []
    for r, res in enumerate(per_rank):
        got_mode = res[mode]
        assert "error" not in got_mode, f"rank {r}:\n{got_mode['error']}"
        for k in KS:
            for case in ("items", "mean", "resume"):
                want = _reference(case, k, world)
                got = got_mode[(case, k)]["params"]
                for name, w in want.items():
                    if not torch.allclose(got[name], w, rtol=RTOL, atol=ATOL):
                        err = float((got[name] - w).abs().max())
                        failures.append(f"rank {r} k={k} {case} {name}: max abs err {err:.3g}")
    assert not failures, f"{mode}, world {world}:\n" + "\n".join(failures[:30])


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_collectives_per_micro_batch(world, mode):
    res = _results(world)[0][mode]
    assert "error" not in res, res.get("error")
    for k in KS:
        for case in ("items", "mean"):
            for boundary, calls in res[(case, k)]["log"]:
                if not boundary:
                    if mode in ("ddp", "zero1", "zero2"):
                        assert calls == {}, f"k={k} {case}: off-boundary collectives {calls}"
                    elif mode == "fsdp2":
                        assert "reduce_scatter_single" not in calls, calls
                    elif mode == "zero2_every":
                        assert calls.get("reduce_scatter_tensor", 0) >= 1, calls
                    elif mode == "fsdp2_every" and world > 1:
                        assert calls.get("reduce_scatter_single", 0) >= 1, calls
                    continue
                count_reductions = 1 if case == "items" and world > 1 else 0
                if mode == "ddp":
                    assert calls.get("ddp_hook", 0) >= 1, calls
                    # the hook's own all_reduce calls + the one item-count all-reduce
                    assert calls.get("all_reduce", 0) == calls["ddp_hook"] + count_reductions, calls
                elif mode == "zero1":
                    assert calls.get("reduce_scatter_tensor", 0) >= 1, calls
                    assert calls.get("all_reduce", 0) == count_reductions, calls
                elif mode in ("zero2", "zero2_every"):
                    assert calls.get("all_reduce", 0) == count_reductions, calls


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "zero1", "fsdp2"])
def test_mid_window_state_finishes_in_another_world_size_and_mode(mode):
    """World 2 saves after 2 of 4 micro-batches; one plain process finishes the window."""
    res = _results(2)
    saved = res[0][mode]
    assert "error" not in saved, saved.get("error")
    for other in res[1:]:  # every rank saves the same logical state
        for name, g in saved["handoff"]["state"]["grads"].items():
            torch.testing.assert_close(other[mode]["handoff"]["state"]["grads"][name], g)
    state = saved["handoff"]["state"]
    model = make_model()
    model.load_state_dict(saved["handoff"]["params"])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    acc = distopt.GradientAccumulator(model, steps=4)
    acc.load_state_dict(state)
    assert acc.micro_step == 2
    for i in (2, 3):
        x, y = batch("items", 4, 0, i, 0)
        with acc.accumulate(num_items=len(y)):
            acc.backward(loss_of(model, x, y, False))
    assert acc.sync_gradients
    opt.step()

    ref = make_model()
    parts = [batch("items", 4, 0, i, r) for i in range(2) for r in range(2)]
    parts += [batch("items", 4, 0, i, 0) for i in (2, 3)]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    (loss_of(ref, x, y, False) / len(y)).backward()
    torch.optim.SGD(ref.parameters(), lr=LR).step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=n)


# --------------------------------------------------------------------------- DeepSpeed


DS_CLIP = 0.45  # gradient_clipping: active in about half of the windows (norms 0.25-1.9)


def _ds_worker(stages: tuple[int, ...], ks: tuple[int, ...]) -> dict:
    os.environ.setdefault("LOCAL_RANK", str(rank()))
    import deepspeed

    out: dict = {}
    for stage in stages:
        for k in ks:
            for case in ("items", "mean"):
                try:
                    model = make_model()
                    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
                    cfg = {
                        "train_micro_batch_size_per_gpu": 1,
                        "gradient_accumulation_steps": k,
                        "zero_optimization": {"stage": stage},
                        "zero_allow_untested_optimizer": True,
                        "gradient_clipping": DS_CLIP,
                        "steps_per_print": 10**9,
                    }
                    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
                    acc = distopt.GradientAccumulator(engine, steps=k)
                    for w, m in enumerate(windows(case, k)):
                        for i in range(m):
                            x, y = batch(case, k, w, i, rank())
                            n = None if case == "mean" else len(y)
                            with acc.accumulate(num_items=n):
                                acc.backward(loss_of(engine, x, y, case == "mean"))
                            assert acc.sync_gradients == engine.is_gradient_accumulation_boundary()
                        if m < k:
                            assert acc.flush()
                    out[(stage, case, k)] = {n: p.detach().clone() for n, p in model.named_parameters()}
                except Exception:
                    out[(stage, case, k)] = {"error": traceback.format_exc()}
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 4])
def test_deepspeed(world):
    pytest.importorskip("deepspeed")
    per_rank = run_distributed(_ds_worker, world, (0, 1, 2), KS, timeout=900)
    failures = []
    for r, res in enumerate(per_rank):
        for (stage, case, k), got in res.items():
            if "error" in got:
                failures.append(f"rank {r} stage {stage} {case} k={k}:\n{got['error']}")
                continue
            want = _reference(case, k, world, DS_CLIP)
            for name, w in want.items():
                if not torch.allclose(got[name], w, rtol=RTOL, atol=ATOL):
                    err = float((got[name] - w).abs().max())
                    failures.append(f"rank {r} stage {stage} {case} k={k} {name}: {err:.3g}")
    assert not failures, "\n".join(failures[:20])
    # the clip is active in some windows and not in others: the
    # normalisation must happen before it
    assert any(CLIPPED) and not all(CLIPPED)


def test_deepspeed_config_mismatch_is_refused():
    """A fake engine is enough: the accumulator checks gradient_accumulation_steps first."""

    class DeepSpeedEngine(nn.Module):  # same class name as DeepSpeed's engine
        def gradient_accumulation_steps(self):
            return 2

    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        distopt.GradientAccumulator(DeepSpeedEngine(), steps=4)

