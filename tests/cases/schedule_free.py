"""Cases: schedule-free AdamW, SGD and RAdam (element-wise; parameters hold ``y`` in train mode).

Every optimizer of a case is put in train mode when it is built (as ``optimizer.train()`` before
training), so the table's checks (reference, peer, sharding, resume) run the training sequence.
The peer is facebookresearch/schedule_free's package where installed (``schedulefree``).
"""

from __future__ import annotations

import importlib

import distopt.optim as do
from tests import references_schedule_free as R
from tests.optim_cases import OptimCase


def _training(opt):
    opt.train()
    return opt


def _peer(cls, **kw):
    def make(params):
        try:
            mod = importlib.import_module("schedulefree")
        except ImportError:
            return None
        return _training(getattr(mod, cls)(params, foreach=False, **kw))

    return make


def _case(id, cls, ref, peer_cls, opts=None, **kw):
    return OptimCase(
        id,
        make=lambda p: _training(cls(p, **kw)),
        reference=lambda p: _training(ref(p, **kw)),
        peer=_peer(peer_cls, **kw),
        family="schedule_free",
        **dict(opts or {}),
    )


_SIM_ONLY = {"extra": {"multiprocess": False}}

CASES = [
    _case("adamw_schedulefree", do.AdamWScheduleFree, R.RefAdamWScheduleFree, "AdamWScheduleFree",
          {"rosen_lr": 3e-2}, lr=1e-2, weight_decay=0.05, warmup_steps=3),
    _case("adamw_schedulefree-r-betas", do.AdamWScheduleFree, R.RefAdamWScheduleFree, "AdamWScheduleFree",
          {"rosen_lr": 3e-2, **_SIM_ONLY}, lr=1e-2, betas=(0.8, 0.99), r=1.0, weight_lr_power=0.0),
    _case("sgd_schedulefree", do.SGDScheduleFree, R.RefSGDScheduleFree, "SGDScheduleFree",
          {"rosen_lr": 3e-3, "model_lr": 0.5}, lr=5e-2, weight_decay=0.05, warmup_steps=2),
    # SGD steps before the rectification starts (step 5 at beta2 = 0.999), so that every check sees the parameters
    # move from the first step; the default silent phase is tested in tests/test_schedule_free.py
    _case("radam_schedulefree", do.RAdamScheduleFree, R.RefRAdamScheduleFree, "RAdamScheduleFree",
          {"rosen_lr": 1e-2, "steps": 14}, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05,
          silent_sgd_phase=False),
    _case("radam_schedulefree-betas", do.RAdamScheduleFree, R.RefRAdamScheduleFree, "RAdamScheduleFree",
          {"rosen_lr": 1e-2, **_SIM_ONLY}, lr=1e-2, betas=(0.8, 0.9), silent_sgd_phase=False),
]  # fmt: skip
