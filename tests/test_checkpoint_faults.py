"""Checkpoint failures across ranks, on a real full disk, and asynchronous saves.

One 2-rank process group (spawning is the expensive part) runs every case:

* a small tmpfs is filled so that the disk runs out in each phase of a save in turn (RNG files,
  metadata, tensors, commit marker; plus an asynchronous save whose failure surfaces at
  ``wait``): both ranks raise ``CheckpointError`` within seconds, naming the rank, the file and
  "no space left on device" with the free space; no ``.partial`` folder is left; the previous
  checkpoint still loads and holds the values saved in it;
* an asynchronous save returns before the files are written, keeps the values of the moment it
  was called while training continues, and loads back exactly;
* a mid-window accumulator state is saved as sharded DCP entries by 2 ranks and finished by one
  process (another world size), matching the 2-rank run;
* a save and a load run exactly plain DCP's collectives for the same state (every cross-rank
  agreement rides in them).

The tmpfs needs root (``mount``); without it the disk-full case is skipped with the reason.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distopt
import distopt.checkpoint as ckpt
from tests.dist import rank, run_distributed
from tests.modes import build, full_params, train_steps

PAGE = 4096
PHASES = ("rng", "meta", "tensors", "marker", "async")


def _pages(n: int) -> int:
    return math.ceil(n / PAGE)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _phase_sizes(folder: Path) -> dict[str, int]:
    """Pages each phase writes, from a complete checkpoint of the same state."""
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()
    }
    tensors = sum(_pages(s) for n, s in files.items() if n.endswith(".distcp") or n == ".metadata")
    data = sum(_pages(s) for n, s in files.items() if n.endswith(".distcp"))
    rng = sum(_pages(s) for n, s in files.items() if n.startswith("rng/"))
    meta = _pages(files["distopt_meta.pt"])
    return {"data": data, "tensors": tensors, "rng": rng, "meta": meta}


def _free_pages_for(phase: str, sz: dict[str, int]) -> int:
    """Free pages to leave so that the disk runs out during ``phase``.  Order of the writes: the
    RNG files (every rank) and the metadata file (rank 0), DCP's data files and ``.metadata``,
    then the commit marker (rank 0)."""
    small = sz["rng"] + sz["meta"]
    if phase == "rng":
        return sz["rng"] // 2
    if phase == "meta":
        return small - 1
    if phase in ("tensors", "async"):
        return small + sz["data"] // 2
    return small + sz["tensors"]  # marker: not one page left for it


def _make():
    return build("zero1", lambda p: distopt.optim.AdamW(p, lr=1e-2))


def _disk_full_cases(full_root: str, dry_root: str) -> dict:
    out: dict = {}
    model, opt, raw = _make()
    train_steps(model, opt, 0, 2)
    saved = full_params(raw)
    mgr = ckpt.CheckpointManager(full_root, keep_last=None)
    mgr.save(1, model=model, optimizer=opt, extra={"step": 1})
    ckpt.save(Path(dry_root) / "dry", model=model, optimizer=opt, extra={"step": 2})
    sz = _phase_sizes(Path(dry_root) / "dry")
    train_steps(model, opt, 2, 3)
    filler = Path(full_root) / "filler"
    for phase in PHASES:
        if rank() == 0:
            target = _free_pages_for(phase, sz) * PAGE
            have = _free(Path(full_root))
            with open(filler, "wb") as f:
                f.write(b"\0" * max(have - target, 0))
            out.setdefault("free_before", {})[phase] = (_free(Path(full_root)), target)
        dist.barrier()
        t0 = time.monotonic()
        try:
            if phase == "async":
                ckpt.save(
                    Path(full_root) / "async",
                    model=model,
                    optimizer=opt,
                    extra={"step": 2},
                    async_=True,
                )
                train_steps(model, opt, 3, 4)  # training goes on while the write fails
                ckpt.wait()
            else:
                mgr.save(2, model=model, optimizer=opt, extra={"step": 2})
            out[phase] = {"error": None}
        except ckpt.CheckpointError as exc:
            out[phase] = {"error": str(exc), "type": type(exc).__name__}
        out[phase]["seconds"] = time.monotonic() - t0
        dist.barrier()
        out[phase]["left"] = sorted(p.name for p in Path(full_root).iterdir())
        dist.barrier()
        if rank() == 0:
            filler.unlink()
        dist.barrier()
    # the previous checkpoint still loads, with the values it was saved with
    model2, opt2, raw2 = _make()
    out["loaded_extra"] = mgr.load_latest(model=model2, optimizer=opt2)
    got = full_params(raw2)
    out["loaded_equal"] = all(torch.equal(got[n], saved[n]) for n in saved)
    return out


def _async_cases(root: str) -> dict:
    out: dict = {}
    model, opt, raw = _make()
    train_steps(model, opt, 0, 2)
    mgr = ckpt.CheckpointManager(root, keep_last=2, async_save=True)
    mgr.save(1, model=model, optimizer=opt, extra={"step": 1})  # warm-up: creates the gloo group
    mgr.wait()
    at_save = full_params(raw)
    t0 = time.perf_counter()
    mgr.save(2, model=model, optimizer=opt, extra={"step": 2})
    out["returned_in"] = time.perf_counter() - t0
    out["visible_before_wait"] = (Path(root) / "step-2" / "COMMITTED").is_file()
    train_steps(model, opt, 2, 4)  # the snapshot must not see these steps
    out["waited"] = str(mgr.wait())
    out["latest"] = str(mgr.latest())
    model2, opt2, raw2 = _make()
    out["extra"] = mgr.load_latest(model=model2, optimizer=opt2)
    got = full_params(raw2)
    out["equal_to_snapshot"] = all(torch.equal(got[n], at_save[n]) for n in at_save)
    # a second async save while one is in flight: waits for it, both complete
    mgr.save(3, model=model, optimizer=opt, extra={"step": 3})
    mgr.save(4, model=model, optimizer=opt, extra={"step": 4})
    mgr.wait()
    out["steps"] = mgr.steps()
    # FSDP2 (DTensor parameters and state): the snapshot takes each rank's rows
    fmodel, fopt, fraw = build("fsdp2", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    train_steps(fmodel, fopt, 0, 2)
    f_at_save = full_params(fraw)
    ckpt.save(f"{root}/fsdp2", model=fmodel, optimizer=fopt, extra={"step": 2}, async_=True)
    train_steps(fmodel, fopt, 2, 3)
    ckpt.wait()
    fmodel2, fopt2, fraw2 = build("fsdp2", lambda p: distopt.optim.AdamW(p, lr=1e-2))
    ckpt.load(f"{root}/fsdp2", model=fmodel2, optimizer=fopt2)
    got = full_params(fraw2)
    out["fsdp2_equal_to_snapshot"] = all(torch.equal(got[n], f_at_save[n]) for n in f_at_save)
    # ZeRO-2 Adafactor: factored statistics complete on the ranks that hold rows of their
    # parameter and absent on the others (the 1x1 and 4x2x3x3 tensors sit on one rank): the
    # asynchronous checkpoint must hold every one of them, as the synchronous one does
    def adafactor(p):
        return distopt.optim.Adafactor(p, lr=1e-2, scale_parameter=False, relative_step=False)

    zmodel, zopt, _ = build("zero2", adafactor)
    train_steps(zmodel, zopt, 0, 2)
    ckpt.save(f"{root}/zero2-sync", model=zmodel, optimizer=zopt)
    ckpt.save(f"{root}/zero2-async", model=zmodel, optimizer=zopt, async_=True)
    train_steps(zmodel, zopt, 2, 3)
    ckpt.wait()
    finals = []
    for name in ("zero2-sync", "zero2-async"):
        m, o, r = build("zero2", adafactor)
        try:
            ckpt.load(f"{root}/{name}", model=m, optimizer=o)
        except ckpt.CheckpointError as exc:
            finals.append(f"{name}: {exc}")
            continue
        train_steps(m, o, 2, 4)
        finals.append(full_params(r))
    out["zero2_async_resumes_as_sync"] = (
        all(isinstance(f, dict) for f in finals)
        and all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])
    ) or [f for f in finals if not isinstance(f, dict)]
    # the background copy failing on one rank: every rank raises at wait (no hang, also not in
    # the step that waits for the copy), nothing is left behind
    from distopt.checkpoint import _async

    real = _async.run_deferred

    def boom(deferred):
        raise RuntimeError("copy failed (injected)")

    if rank() == 1:
        _async.run_deferred = boom
    try:
        ckpt.save(f"{root}/copyfail", model=model, optimizer=opt, async_=True)
        train_steps(model, opt, 4, 5)
        try:
            ckpt.wait()
            out["copy_fail"] = None
        except ckpt.CheckpointError as exc:
            out["copy_fail"] = str(exc)
    finally:
        _async.run_deferred = real
    dist.barrier()
    out["copy_fail_left"] = sorted(os.listdir(root))
    return out


def _accumulator_case(root: str) -> dict:
    from tests.test_accumulate_dist import build as acc_build
    from tests.test_accumulate_dist import micro_batch

    model, opt, acc, plain = acc_build("zero1", 0.0, None, 4)
    for i in range(2):
        micro_batch(acc, model, "items", 4, 0, i)
    ckpt.save(root, model=model, optimizer=opt, accumulator=acc, extra={"micro": 2})
    for i in range(2, 4):
        micro_batch(acc, model, "items", 4, 0, i)
    assert acc.sync_gradients
    opt.step()
    return {p: t.clone() for p, t in full_params(plain).items()}


def _collective_counts(root: str) -> dict:
    """The collectives of plain DCP and of distopt's save/load of the same state."""
    import collections

    import torch.distributed.checkpoint as dcp

    from distopt.checkpoint._save import _collect, _materialize

    model, opt, _ = _make()
    train_steps(model, opt, 0, 1)
    names = ("all_gather_object", "gather_object", "scatter_object_list", "broadcast_object_list",
             "barrier", "all_gather", "all_reduce", "broadcast", "gather", "scatter")  # fmt: skip
    real = {n: getattr(dist, n) for n in names}
    count: collections.Counter = collections.Counter()

    def counting(name):
        def call(*args, **kwargs):
            count[name] += 1
            return real[name](*args, **kwargs)

        return call

    out = {}
    ops = {
        "dcp_save": lambda: dcp.save(_materialize(_collect(model, opt)[0]), checkpoint_id=f"{root}/d"),
        "save": lambda: ckpt.save(f"{root}/c", model=model, optimizer=opt),
        "dcp_load": lambda: dcp.load(_materialize(_collect(model, opt)[0]), checkpoint_id=f"{root}/d"),
        "load": lambda: ckpt.load(f"{root}/c", model=model, optimizer=opt),
    }  # fmt: skip
    try:
        for n in names:
            setattr(dist, n, counting(n))
        for key, fn in ops.items():
            count.clear()
            fn()
            out[key] = dict(count)
    finally:
        for n, f in real.items():
            setattr(dist, n, f)
    return out


def _worker(full_root: str | None, tmp: str) -> dict:
    out = {"async": _async_cases(f"{tmp}/async"), "acc": _accumulator_case(f"{tmp}/acc")}
    out["collectives"] = _collective_counts(f"{tmp}/coll")
    if full_root is not None:
        out["full"] = _disk_full_cases(full_root, tmp)
    return out


def _mount_tmpfs(where: Path, size: str) -> str | None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run mount: {exc}"
    if proc.returncode != 0:
        return f"cannot mount a tmpfs (needs root): {proc.stderr.strip() or proc.returncode}"
    return None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckfaults")
    full = tmp / "full"
    why = _mount_tmpfs(full, "2m")
    try:
        res = run_distributed(_worker, 2, None if why else str(full), str(tmp), timeout=600)
    finally:
        if why is None:
            subprocess.run(["umount", str(full)], capture_output=True, timeout=60)
    return res, why, tmp


@pytest.mark.distributed
@pytest.mark.parametrize("phase", PHASES)
def test_full_disk_in_each_phase(results, phase):
    res, why, _ = results
    if why:
        pytest.skip(why)
    errs = [r["full"][phase] for r in res]
    for r, e in enumerate(errs):
        assert e["error"] is not None, (
            f"rank {r}: the save did not fail ({res[r]['full']['free_before']})"
        )
        assert e["type"] == "CheckpointError"
        assert "no space left on device" in e["error"] and "free" in e["error"], e["error"]
        assert "rank " in e["error"]
        assert e["seconds"] < 60, f"rank {r} took {e['seconds']:.1f}s to fail"
        assert not [n for n in e["left"] if n.endswith(".partial") or n.endswith(".tmp")], e["left"]
        assert "step-2" not in e["left"] and "step-1" in e["left"]
    assert errs[0]["error"] == errs[1]["error"], "ranks disagree on the error"
    assert res[0]["full"]["loaded_extra"] == {"step": 1}
    assert res[0]["full"]["loaded_equal"] and res[1]["full"]["loaded_equal"]


@pytest.mark.distributed
def test_async_save(results):
    res, _, tmp = results
    for r in res:
        a = r["async"]
        assert a["extra"] == {"step": 2}
        assert a["waited"].endswith("step-2") and a["latest"].endswith("step-2")
        assert a["equal_to_snapshot"], (
            "the asynchronous save did not keep the values of the moment it was called"
        )
        assert a["steps"] == [3, 4]
        assert a["fsdp2_equal_to_snapshot"]
        assert a["zero2_async_resumes_as_sync"] is True, a["zero2_async_resumes_as_sync"]
        assert a["copy_fail"] and "rank 1" in a["copy_fail"], a["copy_fail"]
        assert "taking the snapshot" in a["copy_fail"] and "injected" in a["copy_fail"]
        assert not [n for n in a["copy_fail_left"] if "copyfail" in n], a["copy_fail_left"]
    assert ckpt.read_meta(tmp / "async" / "step-4")["extra"] == {"step": 4}


@pytest.mark.distributed
def test_mid_window_accumulator_sharded_and_resumed_at_another_world_size(results, capsys):
    from distopt.cli import main as cli
    from tests.test_accumulate_dist import LR, batch, loss_of, make_model
    from tests.test_accumulate_dist import full_params as acc_full

    res, _, tmp = results
    want = res[0]["acc"]
    path = tmp / "acc"
    meta = ckpt.read_meta(path)
    assert meta["accumulator"]["micro_step"] == 2
    assert all(set(v) == {"shape", "dtype"} for v in meta["accumulator"]["grads"].values())
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert {"acc/emb.weight", "acc/head.weight"} <= set(keys)
    assert len(list(path.glob("__*_*.distcp"))) == 2
    # one process (another world size) finishes the window
    model = make_model()
    opt = distopt.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    acc = distopt.GradientAccumulator(model, steps=4)
    assert ckpt.load(path, model=model, optimizer=opt, accumulator=acc) == {"micro": 2}
    for i in range(2, 4):
        parts = [batch("items", 4, 0, i, r) for r in range(2)]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        with acc.accumulate(num_items=len(y)):
            acc.backward(loss_of(model, x, y, False))
    assert acc.sync_gradients
    opt.step()
    got = acc_full(model)
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-6)
    # inspect shows shapes and sizes, never values
    assert cli(["ckpt", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "acc/emb.weight" in out and "[11, 6]" in out
    assert "tensor(" not in out


@pytest.mark.distributed
def test_save_and_load_run_only_dcps_own_collectives(results):
    res, _, _ = results
    for r in res:
        c = r["collectives"]
        assert c["dcp_save"] and c["dcp_load"], c  # the counting saw DCP's collectives
        assert c["save"] == c["dcp_save"], f"save: {c['save']} vs plain DCP {c['dcp_save']}"
        assert c["load"] == c["dcp_load"], f"load: {c['load']} vs plain DCP {c['dcp_load']}"
