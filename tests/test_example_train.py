"""examples/train.py end to end: one process, torchrun with 2 processes, and bad flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "train.py"
# A tiny configuration: a few seconds per run on one CPU core.
TINY = [
    "--d-model",
    "64",
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--lr",
    "1e-2",
    "--warmup-steps",
    "5",
    "--max-steps",
    "30",
    "--log-every",
    "10",
    "--no-progress",
]
FINAL = re.compile(
    r"final: steps=(\d+) loss=([\d.]+) first_loss=([\d.]+) tokens/s=(\d+) time=([\d.]+)s"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _check_trained(proc: subprocess.CompletedProcess, steps: int) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    matches = FINAL.findall(out)
    assert len(matches) == 1, f"expected exactly one summary line (rank 0 only):\n{out}"
    n, loss, first, tok_s, _ = matches[0]
    assert int(n) == steps
    assert float(first) > 3.5, out  # ~ln(vocab): an untrained model
    assert float(loss) < float(first) - 0.8, out  # it learned something
    assert int(tok_s) > 0


def test_train_single_process():
    proc = _run([sys.executable, str(TRAIN), *TINY])
    _check_trained(proc, 30)
    assert "single process" in proc.stderr


@pytest.mark.distributed
def test_train_torchrun_two_processes():
    proc = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(TRAIN),
            *TINY,
        ]
    )
    _check_trained(proc, 30)
    assert "ddp, world size 2" in proc.stderr


def test_bad_flag_exits_cleanly_in_a_subprocess():
    proc = _run([sys.executable, str(TRAIN), "--zero", "3"], timeout=120)
    assert proc.returncode == 2
    assert "--zero: invalid choice: 3" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# The remaining flag checks run in-process (no torch start-up per case).


def _assert_one_error_line(err: str, message: str) -> None:
    """argparse style: usage, then a single ``prog: error: ...`` line with the message."""
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage:"), err
    assert ": error: " in lines[-1] and message in lines[-1], err
    assert sum(": error: " in line for line in lines) == 1, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def train_mod():
    sys.path.insert(0, str(TRAIN.parent))
    try:
        import train  # examples/train.py
    finally:
        sys.path.remove(str(TRAIN.parent))
    return train


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-steps", "-5"], "--max-steps must be >= 1, got -5"),
        (["--max-steps", "ten"], "--max-steps: invalid int value: 'ten'"),
        (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--zero", "3"], "--zero: invalid choice: 3"),
        (["--fsdp", "--zero", "1"], "--fsdp and --zero are alternatives"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--optim", "no-such-optimizer"], "--optim no-such-optimizer"),
        (["--schedule", "no-such-schedule"], "--schedule no-such-schedule"),
        (["--save-every", "10"], "--save-every and --resume need --save-dir"),
        (["--d-model", "30", "--n-head", "4"], "must be divisible by --n-head"),
    ],
)
def test_bad_flags(train_mod, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        train_mod.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err, message)


def test_missing_distopt_parts_are_clear_errors(train_mod, capsys):
    """Flags that need a part of distopt this checkout lacks fail with one line, not a crash."""
    missing = dict.fromkeys(train_mod.distopt_features())
    cases = [
        (["--accum-steps", "4"], "--accum-steps 4 needs distopt.GradientAccumulator"),
        (["--zero", "1"], "--zero 1 needs distopt.shard"),
        (["--save-dir", "/tmp/x"], "need distopt.checkpoint.save/load"),
        (["--optim", "lamb"], "--optim lamb needs distopt.optim"),
    ]
    for argv, message in cases:
        parser = train_mod.build_parser()
        args = parser.parse_args(argv)
        with pytest.raises(SystemExit) as info:
            train_mod.validate_args(parser, args, missing)
        assert info.value.code == 2
        err = capsys.readouterr().err
        _assert_one_error_line(err, message)
