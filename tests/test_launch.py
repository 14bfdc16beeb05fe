"""Every file in launch/ is exercised (launched on CPU where the engine allows) or validated.

Launched here, on 2 CPU processes:
* examples/accelerate_train.py under launch/accelerate/multi-cpu.yaml (distopt ZeRO-2,
  accumulation, save_state) and under launch/accelerate/deepspeed-zero1.yaml;
* a shape-aware optimizer through plain ``accelerator.prepare`` under
  launch/accelerate/deepspeed-zero2.yaml: refused at its first step (this file's ``__main__``);
* examples/train.py under ``accelerate launch`` (multi-cpu.yaml) and under the ``deepspeed``
  launcher; launch/train.sh (torchrun, c10d rendezvous);
* launch/test-distributed.sh on one small test; launch/slurm.sbatch with stand-ins for srun and
  scontrol (the command it would run is checked).
Validated: multi-gpu.yaml and fsdp2.yaml through Accelerate's own config loader, the DeepSpeed
JSON files in tests/test_integration_deepspeed.py; every shell script parses (``bash -n``).
launch/setup.sh and launch/test.sh are what CI runs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
TINY = ["--d-model", "32", "--n-layer", "1", "--seq-len", "16", "--batch-size", "8",
        "--max-steps", "12", "--lr", "1e-2"]
FINAL = re.compile(r"final: steps=(\d+) loss=([\d.]+) first_loss=([\d.]+) lr=(\S+) mode=(\S+) zero=(\d) world=(\d+)")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    if not _has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if ok:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def _accelerate(config: str, script: list[str], **env: str) -> subprocess.CompletedProcess:
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "accelerate" / config),
           "--num_processes", "2", "--main_process_port", str(_free_port()), *script]
    return _run(cmd, _env(**env))


def _final(proc: subprocess.CompletedProcess) -> tuple:
    m = FINAL.findall(proc.stdout + proc.stderr)
    assert len(m) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return m[0]


# --------------------------------------------------------------------------- Accelerate configs


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_accelerate_example_multi_cpu_zero2(tmp_path):
    proc = _accelerate("multi-cpu.yaml", ["examples/accelerate_train.py", *TINY, "--zero", "2", "--accum-steps", "2",
                                          "--save-dir", str(tmp_path / "state")], ACCELERATE_USE_CPU="1")
    steps, loss, first, lr, mode, zero, world = _final(proc)
    assert (mode, zero, world) == ("DistributedType.MULTI_CPU", "2", "2")
    assert float(loss) < float(first) and float(lr) == 0.0  # cosine ends at 0 after 12 steps
    assert (tmp_path / "state" / "distopt" / "COMMITTED").is_file()


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_accelerate_example_deepspeed_zero1():
    pytest.importorskip("deepspeed")
    proc = _accelerate("deepspeed-zero1.yaml", ["examples/accelerate_train.py", *TINY])
    steps, loss, first, lr, mode, zero, world = _final(proc)
    assert (mode, world) == ("DistributedType.DEEPSPEED", "2")
    assert float(loss) < float(first) and float(lr) == 0.0


def refusal_worker(out_dir: str) -> None:
    """Under deepspeed-zero2.yaml: Lamb through plain accelerator.prepare, as the HF Trainer does.

    Each rank writes its outcome to ``<out_dir>/rank<r>.txt`` (lines printed by two processes
    into one pipe could interleave).
    """
    import torch
    from accelerate import Accelerator
    from torch import nn

    import distopt.optim as O
    from distopt.integrations.accelerate import kwargs_handlers

    acc = Accelerator(kwargs_handlers=kwargs_handlers())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    engine, opt = acc.prepare(model, O.Lamb(model.parameters(), lr=1e-2))
    x = torch.randn(8, 6, device=acc.device)
    try:
        acc.backward(engine(x).pow(2).mean())  # DeepSpeed steps inside backward
        opt.step()
        result = "NOT REFUSED"
    except RuntimeError as exc:
        same = all(torch.equal(a, b.cpu()) for a, b in zip(before, engine.module.parameters()))
        result = f"REFUSED world={acc.num_processes} unchanged={same}: {exc}"
    Path(out_dir, f"rank{acc.process_index}.txt").write_text(result)
    acc.wait_for_everyone()


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_deepspeed_zero2_refuses_shape_aware_through_accelerator_prepare(tmp_path):
    pytest.importorskip("deepspeed")
    proc = _accelerate("deepspeed-zero2.yaml", [str(Path(__file__).resolve()), str(tmp_path)])
    results = [(tmp_path / f"rank{r}.txt") for r in range(2)]
    assert all(f.is_file() for f in results), proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in results:
        text = f.read_text()
        assert text.startswith("REFUSED world=2 unchanged=True"), text
        for word in ("Lamb", "flat 1-D", "whole-tensor", "distopt.shard", "No update was applied"):
            assert word in text, text


@pytest.mark.parametrize("name", ["multi-gpu.yaml", "fsdp2.yaml", "multi-cpu.yaml", "deepspeed-zero1.yaml",
                                  "deepspeed-zero2.yaml"])
def test_accelerate_configs_load(name):
    """Accelerate's own loader accepts each config (unknown keys would raise)."""
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(LAUNCH / "accelerate" / name))
    assert cfg.num_processes == 2 and cfg.num_machines == 1
    kind = str(cfg.distributed_type).split(".")[-1]
    if name == "fsdp2.yaml":
        assert kind == "FSDP" and int(cfg.fsdp_config["fsdp_version"]) == 2
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                state_dict_type="SHARDED_STATE_DICT")
        assert plugin.fsdp_version == 2
    elif name.startswith("deepspeed"):
        assert kind == "DEEPSPEED"
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file(), ds_file
        assert ds_file.stem == name.removeprefix("deepspeed-").removesuffix(".yaml")
    else:
        assert kind == "MULTI_GPU" and cfg.use_cpu == (name == "multi-cpu.yaml")


# --------------------------------------------------------------------------- examples/train.py

TRAIN_TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "16", "--batch-size", "8",
              "--max-steps", "8", "--warmup-steps", "2", "--log-every", "4", "--no-progress", "--lr", "1e-2"]
TRAIN_FINAL = re.compile(r"final: steps=(\d+) loss=([\d.]+) first_loss=([\d.]+)")


def _train_ok(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    m = TRAIN_FINAL.findall(out)
    assert len(m) == 1 and "world size 2" in out, out[-3000:]
    assert float(m[0][1]) < float(m[0][2])


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_train_py_under_accelerate_launch():
    _train_ok(_accelerate("multi-cpu.yaml", ["examples/train.py", *TRAIN_TINY, "--zero", "1"], ACCELERATE_USE_CPU="1"))


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_train_py_under_deepspeed_launcher():
    pytest.importorskip("deepspeed")
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = ([str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"])
    cmd += ["--num_gpus", "2", "--no_local_rank", "--master_port", str(_free_port()),
            "examples/train.py", *TRAIN_TINY]
    _train_ok(_run(cmd, _env()))


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_train_sh_torchrun_c10d():
    env = _env(NPROC="2", MASTER_PORT=str(_free_port()), MAX_RESTARTS="0",
               SETUP_EXTRAS=os.environ.get("DISTOPT_SETUP_EXTRAS", "test,reference"))
    _train_ok(_run(["bash", str(LAUNCH / "train.sh"), *TRAIN_TINY], env, timeout=360))


# --------------------------------------------------------------------------- shell scripts


def test_shell_scripts_parse():
    scripts = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
    assert {p.name for p in scripts} >= {"setup.sh", "test.sh", "train.sh", "test-distributed.sh", "slurm.sbatch"}
    for p in scripts:
        proc = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{p.name}: {proc.stderr}"


def _fake_bin(tmp_path: Path, name: str, body: str) -> None:
    f = tmp_path / "bin" / name
    f.parent.mkdir(exist_ok=True)
    f.write_text("#!/usr/bin/env bash\n" + body)
    f.chmod(f.stat().st_mode | stat.S_IEXEC)


def test_slurm_sbatch_builds_the_srun_torchrun_command(tmp_path):
    """Stand-ins for srun (prints its arguments) and scontrol (expands the node list)."""
    _fake_bin(tmp_path, "srun", 'printf "SRUN"; printf " %s" "$@"; echo\n')
    _fake_bin(tmp_path, "scontrol", 'echo gpu-node-07; echo gpu-node-08\n')
    _fake_bin(tmp_path, "nvidia-smi", "exit 1\n")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8",
               SLURM_SUBMIT_DIR=str(ROOT), MAX_RESTARTS="3")
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--zero", "2"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SRUN"))
    for piece in ("--nodes 2 --ntasks-per-node 1", "-m torch.distributed.run", "--nnodes 2", "--nproc-per-node 8",
                  "--rdzv-backend c10d", "--rdzv-endpoint gpu-node-07:29500", "--rdzv-id distopt-4242",
                  "--max-restarts 3", "examples/train.py --zero 2"):
        assert piece in line, (piece, line)
    # outside a Slurm job it says so
    env.pop("SLURM_JOB_ID")
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "run this with sbatch" in proc.stderr


def test_test_distributed_sh_targets_and_backend(tmp_path):
    """Dry run: CPU -> gloo, parallel; 'GPUs' (a stand-in nvidia-smi) -> serial, NCCL settings."""
    env = dict(os.environ, DISTOPT_DRY_RUN="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    _fake_bin(tmp_path, "nvidia-smi", "exit 1\n")
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(["bash", str(LAUNCH / "test-distributed.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "gloo on CPU" in proc.stderr and "-n auto" in proc.stderr
    for f in ("tests/test_zero.py", "tests/test_harness.py", "tests/test_integration_accelerate.py",
              "tests/test_launch.py", "tests/test_example_train.py"):
        assert f in proc.stderr, (f, proc.stderr)
    _fake_bin(tmp_path, "nvidia-smi", 'printf "GPU 0: A\\nGPU 1: B\\nGPU 2: C\\n"\n')
    proc = subprocess.run(["bash", str(LAUNCH / "test-distributed.sh"), "-k", "zero"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert "3 GPU(s) visible" in proc.stderr and "-n 0 -k zero" in proc.stderr, proc.stderr


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_test_distributed_sh_runs_a_test():
    """For real, through launch/test.sh and setup.sh, on one quick multi-process test."""
    if shutil.which("nvidia-smi"):
        pytest.skip("GPU machine: the docker image runs this script in full")
    proc = _run(["bash", str(LAUNCH / "test-distributed.sh"), "tests/test_harness.py", "-k",
                 "test_results_come_back_by_rank", "-p", "no:cacheprovider", "-q"],
                _env(DISTOPT_TEST_WORKERS="0"), timeout=360, ok=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"\b1 passed\b", out), out[-2000:]


if __name__ == "__main__":
    refusal_worker(sys.argv[1])
