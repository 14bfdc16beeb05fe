"""Cases: the Muon family (muon, nmuon, adamuon, nadamuon), Newton-Schulz in float32.

The iteration runs in float32 here (``ns_dtype``, a distopt option) so that the independent
reference and sharded training can be compared at 1e-5; bf16 (the default, as in timm and
torch) rounds the iteration's input, and a 1-ulp difference of a reduced gradient can flip a
bf16 rounding.  Parity with timm's and torch's Muon in bf16 is in ``tests/test_muon.py``.
"""

from __future__ import annotations

import distopt.optim as do
from tests.optim_cases import OptimCase
from tests.references_muon import RefMuon


def _case(id, multiprocess=True, **kw):
    return OptimCase(
        id,
        make=lambda p: do.Muon(p, ns_dtype="float32", **kw),
        reference=lambda p: RefMuon(p, **kw),
        rosen_lr=5e-2,
        model_lr=2e-2,
        shape_aware=True,
        family="muon",
        extra={"whole_tensor": True, "multiprocess": multiprocess},
    )


CASES = [
    _case("muon", lr=2e-2, weight_decay=0.05),
    _case("nmuon", False, lr=2e-2, nesterov=True, adjust_lr_fn="original", fallback_lr_scale=0.5),
    _case("adamuon", lr=2e-2, algo="adamuon", weight_decay=0.05),
    _case("nadamuon", False, lr=2e-2, algo="adamuon", nesterov=True, adjust_lr_fn="rms_to_rms"),
]
