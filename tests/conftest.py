"""Shared pytest set-up.

Puts the repository root first on ``sys.path`` so that test modules (and the processes that
``tests/dist.py`` spawns) can ``from tests.dist import run_distributed``.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
