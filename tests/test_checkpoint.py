"""Single-process checkpoint tests: exact resume for every optimizer case, crash safety,
corruption and mismatch errors, the manager, import/export and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import distopt.checkpoint as ckpt
from distopt.cli import main as cli
from distopt.schedules import get_scheduler
from tests.modes import build, full_params, train_steps
from tests.optim_cases import CASES

REPO = Path(__file__).resolve().parents[1]
RESUME_CASES = [c for c in CASES if not c.create_graph]


def _sched(opt):
    if opt.param_groups[0].get("lr") is None:  # Adafactor's relative step: no external schedule
        return None
    return get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=12)


def _run(case, steps_before, steps_after, tmp_path, resume=True):
    model, opt, raw = build("single", case.make)
    sched = _sched(opt)
    lrs: list = []
    train_steps(model, opt, 0, steps_before, sched, lrs)
    if not resume:
        train_steps(model, opt, steps_before, steps_before + steps_after, sched, lrs)
        return full_params(raw), lrs, torch.rand(3)
    ckpt.save(
        tmp_path / "c", model=model, optimizer=opt, scheduler=sched, extra={"step": steps_before}
    )
    model2, opt2, raw2 = build("single", case.make)
    sched2 = _sched(opt2)
    torch.manual_seed(1234)  # scramble: load must restore the stream
    extra = ckpt.load(tmp_path / "c", model=model2, optimizer=opt2, scheduler=sched2)
    assert extra == {"step": steps_before}
    train_steps(model2, opt2, steps_before, steps_before + steps_after, sched2, lrs)
    return full_params(raw2), lrs, torch.rand(3)


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c.id for c in RESUME_CASES])
def test_resume_is_bitwise(case, tmp_path):
    torch.manual_seed(5)
    ref, ref_lrs, ref_rng = _run(case, 4, 4, tmp_path, resume=False)
    torch.manual_seed(5)
    got, lrs, rng = _run(case, 4, 4, tmp_path)
    assert lrs == ref_lrs
    assert torch.equal(rng, ref_rng), "the RNG stream did not continue"
    for name, want in ref.items():
        assert torch.equal(got[name], want), f"{case.id}: {name} differs after resume"


def _simple(tmp_path, name="c"):
    model, opt, raw = build("single", lambda p: __import__("distopt").optim.AdamW(p, lr=1e-2))
    train_steps(model, opt, 0, 2)
    ckpt.save(tmp_path / name, model=model, optimizer=opt, extra={"epoch": 1})
    return model, opt


def test_truncated_and_corrupted_files_are_named(tmp_path):
    _simple(tmp_path)
    data = sorted((tmp_path / "c").glob("*.distcp"))[0]
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    model, opt, _ = build("single", lambda p: __import__("distopt").optim.AdamW(p, lr=1e-2))
    with pytest.raises(ckpt.CheckpointError, match=data.name + ".*truncated"):
        ckpt.load(tmp_path / "c", model=model, optimizer=opt)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match=data.name + ".*corrupted"):
        ckpt.load(tmp_path / "c", model=model, optimizer=opt)
    (tmp_path / "c" / ckpt._save_load.META).write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="distopt_meta.pt"):
        ckpt.load(tmp_path / "c", model=model, optimizer=opt, verify_files=False)


def test_incomplete_checkpoint_is_refused(tmp_path):
    _simple(tmp_path)
    (tmp_path / "c" / ckpt._save_load.MARKER).unlink()
    model, opt, _ = build("single", lambda p: __import__("distopt").optim.AdamW(p))
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load(tmp_path / "c", model=model, optimizer=opt)


def test_other_model_lists_mismatched_names(tmp_path):
    _simple(tmp_path)

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 8)  # shape differs
            self.extra_weight = torch.nn.Parameter(torch.zeros(2))  # unexpected here

    other = Other()
    with pytest.raises(ckpt.CheckpointError) as ei:
        ckpt.load(tmp_path / "c", model=other)
    msg = str(ei.value)
    assert "missing in checkpoint (1): extra_weight" in msg
    assert "lin.weight: checkpoint (7, 5) vs model (8, 5)" in msg
    assert "unexpected in checkpoint" in msg and "emb.weight" in msg


def test_optimizer_groups_must_match(tmp_path):
    _simple(tmp_path)
    model, _, raw = build("single", lambda p: None)
    import distopt

    ps = list(raw.parameters())
    opt = distopt.optim.AdamW([{"params": ps[:3]}, {"params": ps[3:]}])
    with pytest.raises(ckpt.CheckpointError, match="param groups"):
        ckpt.load(tmp_path / "c", model=model, optimizer=opt)


def test_manager_rotation_latest_and_every(tmp_path):
    import distopt

    model, opt, _ = build("single", lambda p: distopt.optim.AdamW(p))
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=2, every=3)
    saved = [
        s for s in range(1, 10) if mgr.maybe_save(s, model=model, optimizer=opt, extra={"step": s})
    ]
    assert saved == [3, 6, 9]
    assert mgr.steps() == [6, 9]
    assert mgr.latest() == tmp_path / "step-9"
    # an interrupted newer save is ignored, and so is a pointer to a deleted folder
    (tmp_path / "step-12.partial").mkdir()
    (tmp_path / "step-15").mkdir()
    assert mgr.latest() == tmp_path / "step-9"
    (tmp_path / "latest").write_text("step-3\n")
    assert mgr.latest() == tmp_path / "step-9"
    assert mgr.load_latest(model=model, optimizer=opt) == {"step": 9}
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.CheckpointManager(tmp_path, keep_last=0)


_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch, distopt
    import distopt.checkpoint as ckpt
    from tests.modes import build, train_steps
    root, point = sys.argv[1], sys.argv[2]
    model, opt, _ = build("single", lambda p: distopt.optim.Lamb(p, lr=1e-2))
    mgr = ckpt.CheckpointManager(root, keep_last=2)
    train_steps(model, opt, 0, 2)
    mgr.save(2, model=model, optimizer=opt, extra={"step": 2})
    ckpt.save(root + "/plain", model=model, optimizer=opt, extra={"step": 2})
    train_steps(model, opt, 2, 4)
    def hook(stage):
        if stage == point:
            os.kill(os.getpid(), signal.SIGKILL)
    mgr.save(4, model=model, optimizer=opt, extra={"step": 4}, _on_stage=hook)
    ckpt.save(root + "/plain", model=model, optimizer=opt, extra={"step": 4}, _on_stage=hook)
    print("survived")
    """
)


@pytest.mark.parametrize(
    "point",
    ["start", "tensors_written", "meta_written", "marker_written", "committed", "old_moved_aside"],
)
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, point):
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), point],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    import distopt

    mgr = ckpt.CheckpointManager(tmp_path / "run")
    latest = mgr.latest()
    # Killed before the commit marker: the previous checkpoint.  Killed after the commit but
    # before the ``latest`` pointer moved: the new one, which is complete.  "old_moved_aside"
    # only happens when replacing a plain checkpoint in place (the manager's step succeeded):
    # the committed new copy is found beside the path.
    expected = 4 if point in ("committed", "old_moved_aside") else 2
    assert latest == tmp_path / "run" / f"step-{expected}"
    model, opt, _ = build("single", lambda p: distopt.optim.Lamb(p, lr=1e-2))
    assert mgr.load_latest(model=model, optimizer=opt) == {"step": expected}
    plain = 4 if point == "old_moved_aside" else 2
    assert ckpt.load(tmp_path / "run" / "plain", model=model, optimizer=opt) == {"step": plain}


def test_plain_save_replaced_after_kill_between_renames(tmp_path):
    # simulate the narrow window: old moved aside, new committed copy not yet renamed
    _simple(tmp_path, "x")
    os.replace(tmp_path / "x", tmp_path / "x.old-1")
    model, opt, _ = build("single", lambda p: __import__("distopt").optim.AdamW(p, lr=1e-2))
    assert ckpt.load(tmp_path / "x", model=model, optimizer=opt) == {"epoch": 1}


def test_import_torch_state_dict_and_export_back(tmp_path):
    import distopt

    torch.manual_seed(0)
    model, opt, raw = build("single", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    train_steps(model, opt, 0, 3)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    snapshot = {k: v.clone() for k, v in raw.state_dict().items()}
    train_steps(model, opt, 3, 6)
    want = full_params(raw)

    model2, opt2, raw2 = build(
        "single", lambda p: distopt.optim.AdamW(p, lr=1e-2, weight_decay=0.1)
    )
    raw2.load_state_dict(snapshot)
    ckpt.load_optimizer_state_dict(
        opt2, torch.load(tmp_path / "optimizer.pt", weights_only=False), model=model2
    )
    train_steps(model2, opt2, 3, 6)
    for n, w in want.items():
        torch.testing.assert_close(full_params(raw2)[n], w, rtol=1e-6, atol=1e-7)

    # export: consolidate a distopt checkpoint into torch format, continue with torch.optim
    ckpt.save(tmp_path / "d", model=model2, optimizer=opt2)
    assert (
        cli(
            [
                "ckpt",
                "consolidate",
                str(tmp_path / "d"),
                str(tmp_path / "out.pt"),
                "--model-out",
                str(tmp_path / "model.pt"),
            ]
        )
        == 0
    )
    sd = torch.load(tmp_path / "out.pt", weights_only=False)
    model3, opt3, raw3 = build("single", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    raw3.load_state_dict(torch.load(tmp_path / "model.pt"))
    opt3.load_state_dict(sd)
    model4, opt4, raw4 = build(
        "single", lambda p: distopt.optim.AdamW(p, lr=1e-2, weight_decay=0.1)
    )
    ckpt.load(tmp_path / "d", model=model4, optimizer=opt4)
    train_steps(model3, opt3, 6, 8)
    train_steps(model4, opt4, 6, 8)
    for n, w in full_params(raw4).items():
        torch.testing.assert_close(full_params(raw3)[n], w, rtol=1e-5, atol=1e-6)


def test_cli_inspect(tmp_path, capsys):
    _simple(tmp_path)
    assert cli(["ckpt", "inspect", str(tmp_path / "c"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "world size   1  mode single" in out
    assert "distopt.optim.adamw.AdamW" in out
    assert "emb.weight" in out and "(13, 6)" in out and "exp_avg[13, 6]" in out
    assert cli(["ckpt", "inspect", str(tmp_path / "missing")]) == 2


def test_damaged_files_give_checkpoint_error_and_load_latest_steps_back(tmp_path, caplog):
    import logging

    import distopt

    model, opt, raw = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=None)
    train_steps(model, opt, 0, 2)
    mgr.save(1, model=model, optimizer=opt, extra={"step": 1})
    good = full_params(raw)
    train_steps(model, opt, 2, 3)
    for s in (2, 3, 4):
        mgr.save(s, model=model, optimizer=opt, extra={"step": s})
    (tmp_path / "step-4" / "COMMITTED").write_bytes(b"\x00garbage{")
    (tmp_path / "step-3" / "rng" / "rank-0.pt").write_bytes(b"\xff\xfe not a pickle")
    data = sorted((tmp_path / "step-2").glob("*.distcp"))[0]
    raw_bytes = bytearray(data.read_bytes())
    raw_bytes[len(raw_bytes) // 3] ^= 0x01  # one bit: only the CRC can tell
    data.write_bytes(bytes(raw_bytes))
    fresh = lambda: build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))  # noqa: E731
    m2, o2, _ = fresh()
    with pytest.raises(ckpt.CheckpointError, match="commit marker .*step-4") as ei:
        ckpt.load(tmp_path / "step-4", model=m2, optimizer=o2)
    assert ei.value.corrupt
    with pytest.raises(ckpt.CheckpointError, match=r"rank-0\.pt.*truncated"):
        ckpt.load(tmp_path / "step-3", model=m2, optimizer=o2)
    with pytest.raises(ckpt.CheckpointError, match=r"rank-0\.pt"):  # unchecked: still ours, named
        ckpt.load(tmp_path / "step-3", model=m2, optimizer=o2, verify_files=False)
    with pytest.raises(ckpt.CheckpointError, match=data.name + ".*corrupted"):
        ckpt.load(tmp_path / "step-2", model=m2, optimizer=o2)
    # unchecked reads still never let torch's BaseException (CheckpointException) out
    (tmp_path / "step-2" / data.name).write_bytes(b"short")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(tmp_path / "step-2", model=m2, optimizer=o2, verify_files=False)
    m3, o3, raw3 = fresh()
    with caplog.at_level(logging.WARNING, logger="distopt.checkpoint"):
        assert mgr.load_latest(model=m3, optimizer=o3) == {"step": 1}
    skipped = [
        r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()
    ]
    assert [s.split()[3].rstrip(":").rsplit("/", 1)[-1] for s in skipped] == [
        "step-4",
        "step-3",
        "step-2",
    ]
    for n, w in good.items():
        assert torch.equal(full_params(raw3)[n], w)
    m4, o4, _ = fresh()
    with pytest.raises(ckpt.CheckpointError, match="commit marker"):
        mgr.load_latest(model=m4, optimizer=o4, fallback=False)
    assert issubclass(ckpt.CheckpointError, Exception)


def test_async_save_single_process_and_verify(tmp_path):
    import distopt

    model, opt, raw = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    train_steps(model, opt, 0, 2)
    before = full_params(raw)
    ckpt.save(tmp_path / "a", model=model, optimizer=opt, extra={"step": 2}, async_=True)
    train_steps(model, opt, 2, 4)
    assert ckpt.wait() == tmp_path / "a"
    assert ckpt.wait() is None
    ckpt.verify(tmp_path / "a")  # every byte against the CRC segments recorded while writing
    m2, o2, raw2 = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    assert ckpt.load(tmp_path / "a", model=m2, optimizer=o2) == {"step": 2}
    for n, w in before.items():
        assert torch.equal(full_params(raw2)[n], w)
    # the files are plain DCP: torch's own reader loads them
    import torch.distributed.checkpoint as dcp

    sd = {f"model/{n}": torch.zeros_like(p) for n, p in raw2.named_parameters()}
    dcp.load(sd, checkpoint_id=str(tmp_path / "a"), no_dist=True)
    assert all(torch.equal(sd[f"model/{n}"], w) for n, w in before.items())


_EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import distopt, distopt.checkpoint as ckpt
    from distopt.checkpoint import _save
    from tests.modes import build, train_steps
    model, opt, _ = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    train_steps(model, opt, 0, 2)
    real = _save._write_and_commit
    def slow(**kw):  # the write is still running when the interpreter starts to exit
        time.sleep(1.0)
        real(**kw)
    _save._write_and_commit = slow
    ckpt.CheckpointManager(sys.argv[1], async_save=True).save(2, model=model, optimizer=opt, extra={"step": 2})
    print("returned", flush=True)
    """
)


def test_interpreter_exit_waits_for_async_save(tmp_path):
    import distopt

    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "returned" in proc.stdout, proc.stderr[-2000:]
    mgr = ckpt.CheckpointManager(tmp_path / "run")
    assert mgr.latest() == tmp_path / "run" / "step-2"
    model, opt, _ = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    assert mgr.load_latest(model=model, optimizer=opt) == {"step": 2}


def test_tensor_bytes_are_a_segment_checked_on_the_read_that_loads_them(tmp_path):
    import json

    import distopt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(160, 128), torch.nn.Linear(128, 4))
    opt = distopt.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 160)).sum().backward()
    opt.step()
    ckpt.save(tmp_path / "c", model=model, optimizer=opt)
    marker = json.loads((tmp_path / "c" / "COMMITTED").read_text())
    name = next(n for n in marker["files"] if n.endswith(".distcp"))
    segs = marker["files"][name]["segments"]
    nbytes = 160 * 128 * 4
    big = [s for s in segs if s[1] == nbytes]
    assert len(big) == 3, segs  # weight, exp_avg, exp_avg_sq: each its own segment
    small = [s for s in segs if s[1] < 1024]
    assert small and sum(s[1] for s in segs) == (tmp_path / "c" / name).stat().st_size
    raw = (tmp_path / "c" / name).read_bytes()
    for off, length, _ in (big[1], small[len(small) // 2]):
        bad = bytearray(raw)
        bad[off + length // 2] ^= 0x10
        (tmp_path / "c" / name).write_bytes(bytes(bad))
        m2 = torch.nn.Sequential(torch.nn.Linear(160, 128), torch.nn.Linear(128, 4))
        o2 = distopt.optim.AdamW(m2.parameters(), lr=1e-2)
        with pytest.raises(ckpt.CheckpointError, match=rf"{name}.*corrupted") as ei:
            ckpt.load(tmp_path / "c", model=m2, optimizer=o2)
        assert ei.value.corrupt
        if length == nbytes:
            assert f"bytes {off}..{off + length}" in str(ei.value)
    (tmp_path / "c" / name).write_bytes(raw)
    m3 = torch.nn.Sequential(torch.nn.Linear(160, 128), torch.nn.Linear(128, 4))
    o3 = distopt.optim.AdamW(m3.parameters(), lr=1e-2)
    ckpt.load(tmp_path / "c", model=m3, optimizer=o3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m3.parameters()))


def _zip_record_crcs(data: bytes) -> list[int]:
    """The CRC32 field of every zip central directory entry (``PK\\x01\\x02``) in a DCP file."""
    import struct

    out, pos = [], data.find(b"PK\x01\x02")
    while pos >= 0:
        out.append(struct.unpack_from("<I", data, pos + 16)[0])
        pos = data.find(b"PK\x01\x02", pos + 4)
    return out


@pytest.mark.parametrize("async_", [False, True])
def test_one_crc_per_byte_and_files_stay_plain_dcp(tmp_path, async_):
    """A synchronous save computes one CRC32 per byte (its own, checked on load) instead of
    also torch's zip-record CRC32 that ``torch.load`` never checks; torch's process-wide switch
    is restored afterwards, also after a failed save, and an asynchronous save (training goes
    on beside it) leaves it alone.  Either way plain DCP reads the files."""
    import torch.distributed.checkpoint as dcp

    import distopt

    model, opt, raw = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    train_steps(model, opt, 0, 2)
    before = full_params(raw)
    assert torch.serialization.get_crc32_options()
    ckpt.save(tmp_path / "a", model=model, optimizer=opt, async_=async_)
    ckpt.wait()
    assert torch.serialization.get_crc32_options()
    crcs = [c for f in (tmp_path / "a").glob("*.distcp") for c in _zip_record_crcs(f.read_bytes())]
    assert crcs
    if async_:
        assert any(c != 0 for c in crcs), "an asynchronous save changed torch's CRC32 switch"
    else:
        assert all(c == 0 for c in crcs), "torch's zip CRC32 was computed beside distopt's"
    sd = {f"model/{n}": torch.zeros_like(p) for n, p in raw.named_parameters()}
    dcp.load(sd, checkpoint_id=str(tmp_path / "a"), no_dist=True)
    assert all(torch.equal(sd[f"model/{n}"], w) for n, w in before.items())
    if not async_:
        with pytest.raises(ckpt.CheckpointError):
            ckpt.save(tmp_path / "a", model=model, optimizer=opt, overwrite=False)
        assert torch.serialization.get_crc32_options()


def test_async_snapshot_copied_in_background_and_step_waits_for_it(tmp_path, monkeypatch):
    """An asynchronous save returns before its copy of the state is made (the copy is slowed
    down here); the optimizer step that follows at once waits for the copy, so the checkpoint
    holds the parameters and state of the moment ``save`` was called, not the step's.  Code
    writing outside ``step`` waits with ``wait_snapshot``."""
    import time

    import distopt
    from distopt.checkpoint import _async

    real = _async.run_deferred

    def slow(deferred):
        time.sleep(0.5)
        real(deferred)

    monkeypatch.setattr(_async, "run_deferred", slow)
    model, opt, raw = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    train_steps(model, opt, 0, 2)
    before = full_params(raw)
    state_before = {k: v.clone() for k, v in opt.state[next(iter(raw.parameters()))].items()}
    t0 = time.perf_counter()
    ckpt.save(tmp_path / "a", model=model, optimizer=opt, extra={"step": 2}, async_=True)
    returned = time.perf_counter() - t0
    assert not _async._PENDING.staged.is_set(), "the copy was made before save returned"
    assert returned < 0.5
    train_steps(model, opt, 2, 3)  # its step waits for the copy, then changes every parameter
    assert _async._PENDING is None or _async._PENDING.staged.is_set()
    assert any(not torch.equal(full_params(raw)[n], w) for n, w in before.items())
    assert ckpt.wait() == tmp_path / "a"
    m2, o2, raw2 = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    assert ckpt.load(tmp_path / "a", model=m2, optimizer=o2) == {"step": 2}
    for n, w in before.items():
        assert torch.equal(full_params(raw2)[n], w), n
    got = o2.state[next(iter(raw2.parameters()))]
    for k, v in state_before.items():
        assert torch.equal(got[k], v), k
    # a write outside step: wait_snapshot first
    ckpt.save(tmp_path / "b", model=model, optimizer=opt, async_=True)
    at_save = full_params(raw)
    ckpt.wait_snapshot()
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(1.0)
    ckpt.wait()
    m3, o3, raw3 = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    ckpt.load(tmp_path / "b", model=m3, optimizer=o3)
    assert all(torch.equal(full_params(raw3)[n], w) for n, w in at_save.items())


def test_unpicklable_extra_fails_cleanly(tmp_path):
    """The metadata is pickled beside DCP's write (off the caller's path): a failure there is a
    CheckpointError naming the cause, leaves no ``.partial`` and the previous checkpoint loads."""
    import distopt

    model, opt, raw = build("single", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    train_steps(model, opt, 0, 1)
    ckpt.save(tmp_path / "c", model=model, optimizer=opt, extra={"step": 1})
    for async_ in (False, True):
        with pytest.raises(ckpt.CheckpointError, match="(?i)pickle"):
            ckpt.save(tmp_path / "c", model=model, optimizer=opt, extra={"f": lambda: 0},
                      async_=async_)  # fmt: skip
            ckpt.wait()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
        assert ckpt.read_meta(tmp_path / "c")["extra"] == {"step": 1}
