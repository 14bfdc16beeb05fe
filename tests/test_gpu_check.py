"""launch/gpu-check.sh, tested on the CPU (tests/test_launch.py style).

* Without CUDA (this machine) it exits 0 and says why, writing nothing.
* With a stand-in interpreter that answers the CUDA probe as a GPU machine would and plays the
  stages (pytest, ``distopt bench step``), the script's own logic runs for real: the commands and
  their time limits (within the 8-minute budget), the output folder, the summary and the exit
  status when a stage passes, fails or runs out of time.
* Bad settings are refused with a message.

What the stages check on a GPU is tested here too: tests/test_cuda.py runs its meta-device and
world-size-1 parts on the CPU, tests/test_bench_step.py the ``--device``/``--threads`` options.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "gpu-check.sh"


def _run(env_extra: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _fake_python(tmp_path: Path, pytest_body: str = "exit 0", bench_body: str = "exit 0") -> str:
    """An interpreter stand-in: the CUDA probe (a script on stdin) answers 'one GPU'; the stages
    run the given bodies and log their arguments."""
    f = tmp_path / "fakepython"
    log = tmp_path / "calls.log"
    f.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [[ "$1" == "-" ]]; then cat >/dev/null; echo "CUDA Fake H200, torch 9.9, CUDA 12.9, 1 device(s), NCCL yes"; exit 0; fi
if [[ "$1 $2" == "-m pytest" ]]; then {pytest_body}; fi
if [[ "$1 $2" == "-m distopt.cli" ]]; then {bench_body}; fi
exit 99
""")
    f.chmod(0o755)
    return str(f)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA device is visible: the skip path cannot run"
)
def test_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "out"
    proc = _run({"DISTOPT_PYTHON": sys.executable, "DISTOPT_GPU_CHECK_OUT": str(out)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[gpu-check] skipped:" in proc.stdout and "no CUDA device" in proc.stdout
    assert not out.exists()


def test_dry_run_commands_fit_the_budget(tmp_path):
    proc = _run(
        {
            "DISTOPT_PYTHON": _fake_python(tmp_path),
            "DISTOPT_DRY_RUN": "1",
            "DISTOPT_GPU_CHECK_OUT": str(tmp_path / "out"),
        }
    )
    assert proc.returncode == 0, proc.stderr
    lines = {
        m.group(1): (int(m.group(2)), m.group(3))
        for m in re.finditer(r"\[gpu-check\] (\w+) \(limit (\d+)s\): (.*)", proc.stdout)
    }
    assert set(lines) == {"tests", "bench"}
    assert sum(limit for limit, _ in lines.values()) <= 480
    tests = lines["tests"][1]
    assert "-m pytest tests/test_cuda.py" in tests and "test_bench_step_on_cuda" in tests
    bench = lines["bench"][1]
    assert "-m distopt.cli bench step --device cuda" in bench and "--format md" in bench
    assert "Fake H200" in proc.stderr


def test_stages_summary_and_exit_status(tmp_path):
    out = tmp_path / "out"
    table = "| optimizer | implementation |\\n| AdamW | distopt |"
    fake = _fake_python(
        tmp_path,
        pytest_body='echo "3 passed"; exit 0',
        bench_body=f'echo -e "{table}"; echo "[bench step] progress" >&2; exit 0',
    )
    proc = _run({"DISTOPT_PYTHON": fake, "DISTOPT_GPU_CHECK_OUT": str(out)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tests: passed" in proc.stdout and "bench: done" in proc.stdout
    assert (out / "tests.log").read_text().strip() == "3 passed"
    assert "| AdamW | distopt |" in (out / "bench_step_cuda.md").read_text()
    assert "progress" in (out / "bench_step_cuda.log").read_text()
    calls = (tmp_path / "calls.log").read_text()
    assert "bench step --device cuda" in calls

    # a failing test stage and a bench that runs out of time: exit 1, both named
    (tmp_path / "calls.log").unlink()
    fake = _fake_python(tmp_path, pytest_body="exit 1", bench_body="sleep 30")
    proc = _run(
        {
            "DISTOPT_PYTHON": fake,
            "DISTOPT_GPU_CHECK_OUT": str(out),
            "DISTOPT_GPU_CHECK_BENCH_S": "2",
        }
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tests: FAILED (pytest exit 1" in proc.stdout
    assert "bench: TIMED OUT after 2s" in proc.stdout


def test_bad_settings_are_refused(tmp_path):
    fake = _fake_python(tmp_path)
    proc = _run(
        {
            "DISTOPT_PYTHON": fake,
            "DISTOPT_GPU_CHECK_TESTS_S": "400",
            "DISTOPT_GPU_CHECK_BENCH_S": "200",
        }
    )
    assert proc.returncode == 2 and "exceed the 480s budget" in proc.stderr
    proc = _run({"DISTOPT_PYTHON": fake, "DISTOPT_GPU_CHECK_TESTS_S": "soon"})
    assert proc.returncode == 2 and "positive integers" in proc.stderr
    proc = _run({"DISTOPT_PYTHON": str(tmp_path / "no-such-python")})
    assert proc.returncode == 1 and "no Python interpreter" in proc.stderr
    proc = _run({"DISTOPT_PYTHON": "false"})
    assert proc.returncode == 1 and "cannot import torch" in proc.stderr
