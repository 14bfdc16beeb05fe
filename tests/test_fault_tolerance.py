"""Fault tolerance end to end: ``launch/train.sh`` with ``MAX_RESTARTS=1`` on 2 ranks, where
rank 1 SIGKILLs itself once at step 7.  torchrun restarts both workers, they resume from the
last complete checkpoint (step 4), and the run ends with exactly the parameters of a run
without the fault."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
        "--max-steps", "10", "--warmup-steps", "2", "--log-every", "5", "--no-progress", "--save-every", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    # an own port and rendezvous id: concurrent tests must never join each other's rendezvous
    env = dict(os.environ, OMP_NUM_THREADS="1", DISTOPT_PYTHON=sys.executable, NPROC="2",
               MAX_RESTARTS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(_free_port()),
               RDZV_ID=f"ft-{uuid.uuid4().hex[:8]}")
    return subprocess.run(
        ["bash", str(ROOT / "launch" / "train.sh"), *TINY, "--save-dir", str(tmp / name),
         "--final-state", str(tmp / f"{name}.pt"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )


@pytest.mark.distributed
@pytest.mark.parametrize("mode", [[], ["--zero", "2"]], ids=["ddp", "zero2"])
def test_killed_rank_resumes_to_identical_parameters(tmp_path, mode):
    clean = _launch(tmp_path, "clean", *mode)
    assert clean.returncode == 0, clean.stderr[-3000:]
    faulty = _launch(tmp_path, "faulty", *mode, "--crash-at-step", "7", "--crash-rank", "1")
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    assert "--resume" in faulty.stderr  # added by train.sh because MAX_RESTARTS > 0
    assert "killing myself" in faulty.stderr
    assert "resumed from" in faulty.stderr and "step-4" in faulty.stderr
    a = torch.load(tmp_path / "clean.pt")
    b = torch.load(tmp_path / "faulty.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the restart"
