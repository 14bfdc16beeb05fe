"""GradientAccumulator in one process: normalisation, flush, state, bad input.

The distributed modes (DDP, ZeRO-1/2, FSDP2, DeepSpeed) are in test_accumulate_dist.py; this
file uses the same data and reference (single-process SGD on the concatenated batch).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import distopt
from distopt.accumulate import GradientAccumulator
from tests.test_accumulate_dist import (
    KS,
    LR,
    batch,
    loss_of,
    make_model,
    reference,
    windows,
)

RTOL, ATOL = 1e-5, 1e-6


def _run(case: str, k: int, resume_through_bytes: bool = False) -> dict[str, torch.Tensor]:
    momentum = 0.0 if case == "resume" else 0.9
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    acc = GradientAccumulator(model, steps=k)
    seen = []
    for w, m in enumerate(windows(case, k)):
        for i in range(m):
            if case == "resume" and (w, i) == (1, k // 2):
                state = acc.state_dict()
                if resume_through_bytes:
                    buf = io.BytesIO()
                    torch.save(state, buf)
                    buf.seek(0)
                    state = torch.load(buf, weights_only=True)
                params = {n: p.detach().clone() for n, p in model.named_parameters()}
                model = make_model()
                model.load_state_dict(params)
                opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
                acc = GradientAccumulator(model, steps=k)
                acc.load_state_dict(state)
            x, y = batch(case, k, w, i, 0)
            n = None if case == "mean" else (torch.tensor(len(y)) if i % 2 else len(y))
            with acc.accumulate(num_items=n):
                acc.backward(loss_of(model, x, y, case == "mean"))
            seen.append(acc.sync_gradients)
            if acc.sync_gradients:
                opt.step()
                opt.zero_grad()
        if acc.flush():
            opt.step()
            opt.zero_grad()
    full = [(i + 1) % k == 0 for m in windows(case, k) for i in range(m)]
    assert seen == full
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case", ["items", "mean", "resume"])
def test_single_process_matches_concatenated_batch(case, k):
    got = _run(case, k, resume_through_bytes=True)
    want = reference(case, k, 1, 0.0 if case == "resume" else 0.9)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=RTOL, atol=ATOL, msg=name)


def test_negative_control_naive_normalisation_differs():
    """Averaging per-micro-batch means (the usual loss / k) is not the mean over all items
    for these unequal token counts: the equality tests can fail."""
    k = 4
    want = reference("items", k, 1, 0.9)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for w, m in enumerate(windows("items", k)):
        opt.zero_grad()
        for i in range(m):
            x, y = batch("items", k, w, i, 0)
            if len(y):
                (loss_of(model, x, y, True) / m).backward()
        opt.step()
    diff = max(float((p.detach() - want[n]).abs().max()) for n, p in model.named_parameters())
    assert diff > 1e-3


def test_sync_gradients_sequence_and_counters():
    model = make_model()
    acc = GradientAccumulator(model, steps=3)
    assert not acc.sync_gradients and acc.micro_step == 0
    flags = []
    for i in range(7):
        x, y = batch("items", 3, 0, i, 0)
        with acc.accumulate(num_items=max(len(y), 1)):
            acc.backward(loss_of(model, x, y, False))
            inside = acc.sync_gradients
        flags.append((inside, acc.sync_gradients, acc.micro_step))
    assert flags == [(False, False, 1), (False, False, 2), (True, True, 0),
                     (False, False, 1), (False, False, 2), (True, True, 0), (False, False, 1)]
    assert acc.optimizer_steps == 2 and acc.micro_batches == 7
    assert acc.flush() and acc.sync_gradients and acc.optimizer_steps == 3
    assert not acc.flush() and not acc.sync_gradients
    assert acc.mode == "single process"
    assert "steps=3" in repr(acc)


def test_flush_normalises_by_what_the_short_window_holds():
    model = make_model()
    acc = GradientAccumulator(model, steps=4)
    xs = [batch("items", 4, 1, i, 0) for i in range(2)]
    for x, y in xs:
        with acc.accumulate(num_items=len(y)):
            acc.backward(loss_of(model, x, y, False))
    assert acc.flush()
    got = [p.grad.clone() for p in model.parameters()]
    ref = make_model()
    x = torch.cat([b[0] for b in xs])
    y = torch.cat([b[1] for b in xs])
    (loss_of(ref, x, y, False) / len(y)).backward()
    for g, p in zip(got, ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=RTOL, atol=ATOL)


def test_state_dict_at_a_window_start_is_small_and_loads_anywhere():
    model = make_model()
    acc = GradientAccumulator(model, steps=2)
    for i in range(2):
        x, y = batch("items", 2, 0, i, 0)
        with acc.accumulate(num_items=len(y)):
            acc.backward(loss_of(model, x, y, False))
    sd = acc.state_dict()
    assert sd["micro_step"] == 0 and sd["grads"] == {} and sd["optimizer_steps"] == 1
    other = GradientAccumulator(make_model(), steps=5)  # another k is fine at a window start
    other.load_state_dict(sd)
    assert other.optimizer_steps == 1 and other.micro_batches == 2 and other.micro_step == 0


def test_exception_in_block_does_not_count_the_micro_batch():
    model = make_model()
    acc = GradientAccumulator(model, steps=2)
    with pytest.raises(KeyError):
        with acc.accumulate(num_items=3):
            raise KeyError("boom")
    assert acc.micro_step == 0 and acc.micro_batches == 0 and not acc.sync_gradients
    x, y = batch("items", 2, 0, 0, 0)
    with acc.accumulate(num_items=len(y)):
        acc.backward(loss_of(model, x, y, False))
    assert acc.micro_step == 1


def test_zero_items_on_some_micro_batches_is_fine():
    model = make_model()
    acc = GradientAccumulator(model, steps=2)
    x, y = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    with acc.accumulate(num_items=0):
        acc.backward(loss_of(model, x, y, False))
    x, y = batch("items", 2, 0, 0, 0)
    with acc.accumulate(num_items=len(y)):
        acc.backward(loss_of(model, x, y, False))
    assert acc.sync_gradients
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("steps", [0, -1])
def test_steps_below_one(steps):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        GradientAccumulator(make_model(), steps=steps)


@pytest.mark.parametrize("steps", [1.5, True, "2", None])
def test_steps_not_an_int(steps):
    with pytest.raises(TypeError, match="steps must be an int"):
        GradientAccumulator(make_model(), steps=steps)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        GradientAccumulator(object(), steps=2)


def test_num_items_zero_on_every_micro_batch():
    model = make_model()
    acc = GradientAccumulator(model, steps=2)
    x, y = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    with acc.accumulate(num_items=0):
        acc.backward(loss_of(model, x, y, False))
    with pytest.raises(ValueError, match="summed to 0"):
        with acc.accumulate(num_items=torch.tensor(0)):
            acc.backward(loss_of(model, x, y, False))


def test_backward_outside_accumulate():
    model = make_model()
    acc = GradientAccumulator(model, steps=2)
    x, y = batch("items", 2, 0, 0, 0)
    with pytest.raises(RuntimeError, match="inside `with acc.accumulate"):
        acc.backward(loss_of(model, x, y, False))


def test_block_without_backward():
    model = make_model()
    acc = GradientAccumulator(model, steps=2)
    x, y = batch("items", 2, 0, 0, 0)
    with pytest.raises(RuntimeError, match="without acc.backward"):
        with acc.accumulate(num_items=len(y)):
            loss_of(model, x, y, False).backward()  # the plain backward: not seen
    assert acc.micro_step == 0


def test_nested_blocks_and_flush_inside():
    acc = GradientAccumulator(make_model(), steps=2)
    with pytest.raises(RuntimeError, match="nested"):
        with acc.accumulate(), acc.accumulate():
            pass
    with pytest.raises(RuntimeError, match="flush"):
        with acc.accumulate():
            acc.flush()
    with pytest.raises(RuntimeError, match="state_dict"):
        with acc.accumulate():
            acc.state_dict()


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                                     (True, TypeError), ("3", TypeError),
                                     (torch.ones(2), ValueError)])
def test_bad_num_items(bad, exc):
    acc = GradientAccumulator(make_model(), steps=2)
    with pytest.raises(exc):
        with acc.accumulate(num_items=bad):
            pass


def test_sums_and_means_cannot_mix_in_a_window():
    model = make_model()
    acc = GradientAccumulator(model, steps=3)
    x, y = batch("mean", 3, 0, 0, 0)
    with acc.accumulate(num_items=len(y)):
        acc.backward(loss_of(model, x, y, False))
    with pytest.raises(ValueError, match="cannot be mixed"):
        with acc.accumulate(num_items=None):
            acc.backward(loss_of(model, x, y, True))


def test_load_state_dict_errors():
    model = make_model()
    acc = GradientAccumulator(model, steps=4)
    x, y = batch("items", 4, 0, 0, 0)
    with acc.accumulate(num_items=len(y)):
        acc.backward(loss_of(model, x, y, False))
    sd = acc.state_dict()
    assert sd["micro_step"] == 1 and set(sd["grads"]) == {n for n, _ in model.named_parameters()}
    with pytest.raises(RuntimeError, match="window start"):
        acc.load_state_dict(sd)  # this one is mid-window itself
    with pytest.raises(ValueError, match="steps=3"):
        GradientAccumulator(make_model(), steps=3).load_state_dict(sd)
    with pytest.raises(ValueError, match="does not fit"):
        GradientAccumulator(make_model(), steps=1).load_state_dict(sd)
    with pytest.raises(KeyError, match="missing keys"):
        GradientAccumulator(make_model(), steps=4).load_state_dict({"steps": 4})


def test_reduce_every_micro_batch_is_refused_without_sharded_gradients():
    """DDP and ZeRO-1 refuse it (checked in a world of one, in process)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():  # another test of this process owns the default group
        pytest.skip("torch.distributed is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DDP(make_model())
        with pytest.raises(ValueError, match="sharded gradients"):
            GradientAccumulator(ddp, steps=2, reduce_every_micro_batch=True)
        model = make_model()
        sharded, _ = distopt.shard(model, distopt.optim.SGD(model.parameters(), lr=0.1), stage=1)
        with pytest.raises(ValueError, match="stage 2"):
            GradientAccumulator(sharded, steps=2, reduce_every_micro_batch=True)
        assert GradientAccumulator(ddp, steps=2).mode == "DistributedDataParallel"
        assert GradientAccumulator(sharded, steps=2).mode == "distopt ZeRO-1"
    finally:
        dist.destroy_process_group()


def test_fsdp1_is_refused():
    class FullyShardedDataParallel(nn.Module):  # same class name as torch's FSDP1 wrapper
        pass

    with pytest.raises(TypeError, match="FSDP2"):
        GradientAccumulator(FullyShardedDataParallel(), steps=2)
