"""Cases: PSGD Kron (kron, kronw, kronc) against the dense-Kronecker reference and timm's Kron.

timm's Kron draws its balancing decision and probe seeds from ``self.rng`` (a
``random.Random(1337)``) and, with ``deterministic=True``, each probe from a torch generator
seeded by one of those draws.  The peer here is timm's class with ``self.rng`` drawing from a
seeded ``torch.Generator`` the same way distopt's stream does (uniform, probe seed) and its
``torch.compile`` switched off (eager, the published maths; inductor would only change rounding
and cost minutes of CPU): the same random numbers reach both implementations.
"""

from __future__ import annotations

import torch

import distopt.optim as do
from tests.optim_cases import OptimCase
from tests.references import load_timm_optim
from tests.references_kron import RefKron


class TorchStream:
    """Stands in for timm Kron's ``self.rng``: the draws of distopt's stream, from ``seed``."""

    def __init__(self, seed: int = 1337):
        self.gen = torch.Generator().manual_seed(seed)

    def random(self) -> float:
        return float(torch.rand((), generator=self.gen, dtype=torch.float64))

    def randint(self, a: int, b: int) -> int:
        return int(torch.randint(a, 2**31, (), generator=self.gen))


def timm_kron(params, seed: int = 1337, **kw):
    """timm's Kron, eager, drawing from :class:`TorchStream` (None when timm is absent)."""
    mod = load_timm_optim("kron")
    if mod is None:
        return None
    mod.has_dynamo = False  # read by the constructor: eager functions instead of torch.compile
    opt = mod.Kron(params, deterministic=True, **kw)
    opt.rng = TorchStream(seed)
    return opt


def _case(id, multiprocess=True, **kw):
    return OptimCase(
        id,
        make=lambda p: do.Kron(p, **kw),
        reference=lambda p: RefKron(p, **kw),
        peer=lambda p: timm_kron(p, **kw),
        rosen_lr=2e-3,
        rosen_steps=1500,
        model_lr=1e-2,
        shape_aware=True,
        family="kron",
        extra={"whole_tensor": True, "multiprocess": multiprocess},
    )


CASES = [
    _case("kron", lr=3e-3, weight_decay=0.05),
    _case("kronw-stochastic", False, lr=3e-3, weight_decay=0.1, decoupled_decay=True,
          stochastic_weight_decay=True, preconditioner_update_probability=0.5, flatten=True,
          memory_save_mode="all_diag"),
]  # fmt: skip
