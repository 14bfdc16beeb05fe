"""distopt.integrations.accelerate: prepare, schedules, accumulation, save_state/load_state.

Two `accelerate launch --config_file launch/accelerate/multi-cpu.yaml --num_processes 2`
launches of this file (its ``__main__`` is the worker) prove the issue's "done when":

* launch A trains two model/optimizer pairs side by side for N optimizer steps of 2
  micro-batches: pair Z is distopt ZeRO-2 (``prepare(..., zero_stage=2)``) with Lamb, stepped
  through ``accelerator.accumulate`` + ``accelerator.backward``; pair D is the same Lamb
  unsharded (DDP) with distopt's accumulator (``GradientAccumulator`` adapter).  At step K it
  calls ``accelerator.save_state`` and goes on: an uninterrupted run.
* launch B is fresh: ``accelerator.load_state`` and the steps K..N.

Checks: B ends with A's parameters and lrs (bitwise), Z agrees with D (sharded vs not,
``accelerator.accumulate`` vs distopt's accumulator), parameters agree across ranks, and the lr
per optimizer step is the schedule's ``lr_at(step)`` at 2 processes even with Accelerate's
default ``step_scheduler_with_optimizer=True``.  In-process tests (one process, no launch)
cover the error paths.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
N_STEPS, SAVE_AT, MICRO = 6, 3, 2
LR, WARMUP = 5e-2, 2


# --------------------------------------------------------------------------- shared pieces


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))


def make_opt_sched(model: nn.Module):
    import distopt.optim as O
    from distopt.schedules import get_cosine_schedule_with_warmup

    opt = O.Lamb(model.parameters(), lr=LR, weight_decay=0.01)
    return opt, get_cosine_schedule_with_warmup(opt, WARMUP, N_STEPS)


def batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(4, 7, generator=g), torch.randn(4, 3, generator=g)


# --------------------------------------------------------------------------- the worker


def worker(argv: list[str]) -> None:
    from accelerate import Accelerator

    from distopt.integrations.accelerate import GradientAccumulator, prepare

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    acc = Accelerator(gradient_accumulation_steps=MICRO)  # Accelerate's default scheduler flags
    rank = acc.process_index

    mz = make_model()
    oz, sz = make_opt_sched(mz)
    mz, oz, sz = prepare(acc, mz, oz, sz, zero_stage=2)
    md = make_model()
    od, sd = make_opt_sched(md)
    md, od, sd = prepare(acc, md, od, sd)
    accum = GradientAccumulator(acc, md)

    start = 0
    if args.resume:
        acc.load_state(args.ckpt)
        start = SAVE_AT
    lrs: dict[int, list[float]] = {}
    for step in range(start, N_STEPS):
        for micro in range(MICRO):
            x, y = batch(step, micro, rank)
            with acc.accumulate(mz):
                acc.backward(nn.functional.mse_loss(mz(x), y))
            with accum.accumulate():
                accum.backward(nn.functional.mse_loss(md(x), y))
            assert acc.sync_gradients == (micro == MICRO - 1) == accum.sync_gradients
            for o, s in ((oz, sz), (od, sd)):
                o.step()
                s.step()
                o.zero_grad()
        lrs[step] = [oz.param_groups[0]["lr"], od.param_groups[0]["lr"]]
        if step + 1 == SAVE_AT and not args.resume:
            acc.save_state(args.ckpt)

    def params(m):
        return {n: p.detach().clone() for n, p in m.named_parameters()}

    pz = params(mz.module)
    pd = params(md.module if hasattr(md, "module") else md)
    gathered = [None] * acc.num_processes
    torch.distributed.all_gather_object(gathered, (pz, pd))
    if rank == 0:
        info = {
            "distributed_type": str(acc.distributed_type),
            "num_processes": acc.num_processes,
            "ranks": gathered,
            "lrs": lrs,
            "files": sorted(os.listdir(args.ckpt)) if os.path.isdir(args.ckpt) else [],
        }
        with open(args.out, "wb") as f:
            pickle.dump(info, f)
    acc.wait_for_everyone()
    acc.end_training()


# --------------------------------------------------------------------------- launched tests


def accelerate_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def accelerate_launch(config: str, script: list[str], nproc: int = 2, timeout: float = 240,
                      env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <config> --num_processes <nproc> <script...>`.

    Runs Accelerate's launch command as ``python -m accelerate.commands.launch`` (the same code
    as the ``accelerate`` console script, which also imports optional packages such as timm).
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config),
           "--num_processes", str(nproc), "--main_process_port", str(port), *script]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or accelerate_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def expected_lrs() -> list[float]:
    """The lr recorded after optimizer step ``s`` (0-based): ``lr_at(s + 1)``."""
    _, sched = make_opt_sched(make_model())
    return [sched.lr_at(s + 1) for s in range(N_STEPS)]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_save_state_load_state_resume_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    ckpt, out_a, out_b = tmp_path / "state", tmp_path / "a.pkl", tmp_path / "b.pkl"
    me = str(Path(__file__).resolve())
    accelerate_launch("launch/accelerate/multi-cpu.yaml", [me, "--out", str(out_a), "--ckpt", str(ckpt)])
    accelerate_launch("launch/accelerate/multi-cpu.yaml",
                      [me, "--out", str(out_b), "--ckpt", str(ckpt), "--resume"])
    a = pickle.loads(out_a.read_bytes())
    b = pickle.loads(out_b.read_bytes())
    assert a["num_processes"] == 2 and a["distributed_type"].endswith("MULTI_CPU"), a
    # the distopt checkpoints are in the Accelerate folder; Accelerate's model files are not
    assert {"distopt", "distopt_1"} <= set(a["files"]), a["files"]
    assert not any(f.startswith("model") for f in a["files"]), a["files"]
    # every rank holds the same parameters
    for run in (a, b):
        for r in run["ranks"][1:]:
            for x, y in zip(run["ranks"][0], r):
                for n in x:
                    assert torch.equal(x[n], y[n]), n
    (za, da), (zb, db) = a["ranks"][0], b["ranks"][0]
    # resumed == uninterrupted, bit for bit (sharded Lamb state restored on every rank)
    for n in za:
        assert torch.equal(za[n], zb[n]), f"ZeRO-2 pair, {n}: {(za[n] - zb[n]).abs().max()}"
        assert torch.equal(da[n], db[n]), f"DDP pair, {n}: {(da[n] - db[n]).abs().max()}"
    for s in range(SAVE_AT, N_STEPS):
        assert a["lrs"][s] == b["lrs"][s], (s, a["lrs"][s], b["lrs"][s])
    # accelerator.accumulate on ZeRO-2 == distopt's accumulator on DDP
    for n in za:
        torch.testing.assert_close(za[n], da[n], rtol=1e-5, atol=1e-6, msg=n)
    # one schedule step per optimizer step at 2 processes (Accelerate's default would do 2)
    want = expected_lrs()
    for s in range(N_STEPS):
        assert a["lrs"][s] == pytest.approx([want[s]] * 2, rel=1e-12), (s, a["lrs"][s], want[s])


# --------------------------------------------------------------------------- in-process


@pytest.fixture()
def accelerator():
    acc_mod = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for cls in (AcceleratorState, GradientState, PartialState):
        cls._reset_state() if hasattr(cls, "_reset_state") else None
    acc = acc_mod.Accelerator(cpu=True)
    yield acc
    for cls in (AcceleratorState, GradientState, PartialState):
        cls._reset_state() if hasattr(cls, "_reset_state") else None


def test_single_process_save_load_round_trip(accelerator, tmp_path):
    from distopt.integrations.accelerate import prepare

    def run(steps, load=None, save=None):
        model = make_model()
        opt, sched = make_opt_sched(model)
        model, opt, sched = prepare(accelerator, model, opt, sched)
        if load:
            accelerator.load_state(load)
        for step in range(steps):
            x, y = batch(step + (SAVE_AT if load else 0), 0, 0)
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            sched.step()
            opt.zero_grad()
        if save:
            accelerator.save_state(save)
        return model, opt, sched

    m1, o1, s1 = run(N_STEPS)
    accelerator.free_memory()
    run(SAVE_AT, save=tmp_path / "s")
    assert (tmp_path / "s" / "distopt" / "COMMITTED").is_file()
    # Accelerate's optimizer file holds the marker only; the real state is distopt's
    marker = torch.load(tmp_path / "s" / "optimizer.bin", weights_only=False)
    assert marker == {"distopt_checkpoint": "distopt", "format": 1}
    accelerator.free_memory()
    m2, o2, s2 = run(N_STEPS - SAVE_AT, load=tmp_path / "s")
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
    assert s1.scheduler.last_epoch == s2.scheduler.last_epoch == N_STEPS
    # outside save_state, state_dict() is the real one
    assert "state" in o2.state_dict() and len(o2.state_dict()["state"]) == 6


def test_marker_without_hooks_is_an_error(accelerator):
    from distopt.integrations.accelerate import prepare

    model = make_model()
    opt, _ = make_opt_sched(model)
    model, opt = prepare(accelerator, model, opt)
    with pytest.raises(RuntimeError, match="distopt marker"):
        opt.load_state_dict({"distopt_checkpoint": "distopt", "format": 1})


def test_load_state_without_distopt_folder_is_an_error(accelerator, tmp_path):
    import distopt.checkpoint as ckpt
    from distopt.integrations.accelerate import prepare

    model = make_model()
    opt, _ = make_opt_sched(model)
    model, opt = prepare(accelerator, model, opt)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no distopt checkpoint"):
        accelerator.load_state(tmp_path / "plain")


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_scheduler_steps_once_per_optimizer_step(accelerator):
    """Micro-steps and skipped steps do not move the schedule; real steps move it by one."""
    from distopt.integrations.accelerate import prepare

    model = make_model()
    opt, sched = make_opt_sched(model)
    model, opt, sched = prepare(accelerator, model, opt, sched)
    accelerator.gradient_state._set_sync_gradients(False)
    sched.step()
    assert sched.scheduler.last_epoch == 0
    accelerator.gradient_state._set_sync_gradients(True)
    sched.step()
    assert sched.scheduler.last_epoch == 1
    opt._is_overflow = True  # what AcceleratedOptimizer records after a skipped fp16 step
    assert opt.step_was_skipped
    sched.step()
    assert sched.scheduler.last_epoch == 1


def test_accumulator_must_agree_with_accelerator(accelerator):
    from distopt.integrations.accelerate import GradientAccumulator

    accelerator.gradient_accumulation_steps = 4
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        GradientAccumulator(accelerator, make_model(), steps=2)
    assert GradientAccumulator(accelerator, make_model()).steps == 4


def test_zero_stage_needs_one_model_and_one_optimizer(accelerator):
    from distopt.integrations.accelerate import prepare

    model = make_model()
    with pytest.raises(ValueError, match="exactly one model and one distopt optimizer"):
        prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), zero_stage=1)


def test_deepspeed_plugin_offload_keeps_the_distopt_optimizer(caplog):
    """Accelerate would swap a client optimizer for DeepSpeed's CPU Adam under offload."""
    import logging

    import distopt.optim as O
    from distopt.integrations.accelerate import _keep_client_optimizer_under_offload

    opt = O.AdamW(make_model().parameters())
    cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with caplog.at_level(logging.WARNING, logger="distopt.integrations.deepspeed"):
        _keep_client_optimizer_under_offload(opt, cfg)
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert "distopt's AdamW runs on DeepSpeed's fp32 partitions on the CPU" in caplog.text
    assert "NOT replaced" in caplog.text
    cfg["zero_force_ds_cpu_optimizer"] = True
    with pytest.raises(ValueError, match="would replace distopt's AdamW"):
        _keep_client_optimizer_under_offload(opt, cfg)
    _keep_client_optimizer_under_offload(opt, {"zero_optimization": {"stage": 2}})  # no offload: quiet


if __name__ == "__main__":
    worker(sys.argv[1:])
