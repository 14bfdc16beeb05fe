"""Shared pytest set-up.

Puts the repository root first on ``sys.path`` so that test modules (and the processes that
``tests/dist.py`` spawns) can ``from tests.dist import run_distributed``.
"""

from __future__ import annotations

import os
import sys

# Optimizer updates run the eager form of their one rule (distopt/optim/_kernel.py) in the test
# processes and every process they spawn: compiling kernels in each of them would cost minutes.
# tests/test_kernels.py runs the whole case table compiled against eager in one process.
os.environ.setdefault("DISTOPT_KERNELS", "eager")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
