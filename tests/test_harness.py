"""Tests for the multi-process harness in tests/dist.py."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.dist import DistributedTestError, device, rank, run_distributed, world_size

pytestmark = pytest.mark.distributed


def _identity(tag, *, scale=1):
    import torch.distributed as dist

    assert dist.is_initialized()
    assert dist.get_rank() == rank() and dist.get_world_size() == world_size()
    return {
        "rank": rank(),
        "world_size": world_size(),
        "device": str(device()),
        "tag": tag,
        "value": rank() * scale,
    }


def _all_reduce_sum():
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank() + 1), 1.0], device=device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def _raise_on_rank_1():
    import torch.distributed as dist

    if rank() == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # rank 0 waits for rank 1, which never arrives
    return "unreachable"


def _hang_on_rank_1(pid_dir):
    with open(os.path.join(pid_dir, f"{rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if rank() == 1:
        time.sleep(3600)
    return rank()


def _sigkill_rank_0(pid_dir):
    import torch.distributed as dist

    with open(os.path.join(pid_dir, f"{rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return rank()


def _assert_dead(pid_dir):
    for name in os.listdir(pid_dir):
        pid = int(open(os.path.join(pid_dir, name)).read())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_single_rank():
    [res] = run_distributed(_identity, 1, "solo")
    assert res == {"rank": 0, "world_size": 1, "device": res["device"], "tag": "solo", "value": 0}


def test_results_come_back_by_rank_with_args_and_kwargs():
    res = run_distributed(_identity, 2, "x", scale=10)
    assert [r["rank"] for r in res] == [0, 1]
    assert [r["value"] for r in res] == [0, 10]
    assert all(r["world_size"] == 2 and r["tag"] == "x" for r in res)


def test_four_rank_all_reduce():
    res = run_distributed(_all_reduce_sum, 4)
    assert res == [[10.0, 4.0]] * 4


def test_exception_reports_rank_and_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank_1, 2, timeout=60)
    msg = str(info.value)
    assert "rank 1 raised an exception" in msg
    assert "Traceback (most recent call last)" in msg
    assert "ValueError: boom from rank one" in msg
    assert "_raise_on_rank_1" in msg  # the frame of the failing function is in the traceback


def test_hang_is_reported_as_timeout_and_killed(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_hang_on_rank_1, 2, str(tmp_path), timeout=5)
    assert time.monotonic() - t0 >= 5
    msg = str(info.value)
    assert "timeout" in msg and "rank(s) 1 did not finish" in msg
    assert "rank 0" not in msg.split("failed:")[1].split("-----")[0]  # rank 0 finished
    assert "time.sleep" in msg or "_hang_on_rank_1" in msg  # stack dump of the hung rank
    _assert_dead(tmp_path)


def test_rank_killed_by_signal_is_reported(tmp_path):
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_sigkill_rank_0, 2, str(tmp_path), timeout=30)
    msg = str(info.value)
    assert "rank 0 died without reporting a result (killed by SIGKILL)" in msg
    # rank 1 either notices the dead peer (gloo raises) or is killed after the grace period
    assert "rank(s) 1 did not finish" in msg or "rank 1 raised an exception" in msg
    _assert_dead(tmp_path)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_identity, 5, "x")
    with pytest.raises(ValueError, match="module-level"):
        run_distributed(lambda: None, 1)
