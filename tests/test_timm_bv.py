"""timm 1.0's Big Vision Adafactor and the AdamW / Lamb / RAdam option names: parity with timm.

Each name, built by ``distopt.optim.create_optimizer_v2``, equals timm's class at timm's
per-name defaults (``torch.optim.RAdam`` for ``radamw``) after 20 steps on a model with conv,
linear, norm and bias parameters (1e-5).  AdafactorBigVision runs at timm's defaults (bf16
momentum) and with the factored paths forced on (dim 0 the largest dim, dim 0 the second
largest), clipping and unscaled decay.  The case table (``tests/cases/timm1_bv.py``) covers the
references, sharding and resume; here also the factoring that never involves dim 0 (a 3-D tensor),
sharded in the simulator.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from torch import nn

import distopt.optim as do
from distopt.optim.adafactor_bv import factored_dims
from tests.references import load_timm_optim
from tests.shard_sim import ShardedSim
from tests.test_timm_names import _timm_registry

STEPS = 20

# name -> (timm module, class); None: torch.optim
TIMM_CLASS = {
    "adafactorbv": ("adafactor_bv", "AdafactorBigVision"),
    "adafactorbvc": ("adafactor_bv", "AdafactorBigVision"),
    "cadafactorbv": ("adafactor_bv", "AdafactorBigVision"),
    "cadafactorbvc": ("adafactor_bv", "AdafactorBigVision"),
    "adamc": ("adamw", "AdamWLegacy"),
    "cadamw": ("adamw", "AdamWLegacy"),
    "cadamc": ("adamw", "AdamWLegacy"),
    "clamb": ("lamb", "Lamb"),
    "clambw": ("lamb", "Lamb"),
    "lambcd": ("lamb", "Lamb"),
    "radamw": (None, "RAdam"),
}
_BV_FACTORED = {"min_dim_size_to_factor": 3, "clipping_threshold": 1.0, "unscaled_wd": True}
RUNS = [(name, {}) for name in TIMM_CLASS] + [
    (name, _BV_FACTORED) for name in ("adafactorbv", "cadafactorbvc")
]


class ConvNet(nn.Module):
    """Conv without bias before a BatchNorm, conv with bias, Linear, LayerNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)  # (8, 3, 3, 3): dim 0 the largest
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.fc1 = nn.Linear(32, 16)  # (16, 32): dim 0 the second largest
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        h = self.dw(torch.relu(self.bn(self.conv(x))))
        return self.fc2(torch.tanh(self.ln(self.fc1(h.flatten(1)))))


def _train(make):
    torch.manual_seed(0)
    model = ConvNet()
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randn(8, 6, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@functools.cache
def _start():
    torch.manual_seed(0)
    return [p.detach().clone() for p in ConvNet().parameters()]


def _timm_class(name):
    module, cls = TIMM_CLASS[name]
    if module is None:
        return getattr(torch.optim, cls)
    mod = load_timm_optim(module)
    if mod is None:
        pytest.skip("timm not installed")
    return getattr(mod, cls)


@pytest.mark.parametrize(
    "name,opts", RUNS, ids=[f"{n}-{'factored' if o else 'defaults'}" for n, o in RUNS]
)
def test_matches_timm_after_20_steps(name, opts):
    cls = _timm_class(name)
    timm_defaults = _timm_registry()[name]
    kw = {"lr": 0.05 if "adafactorbv" in name else 1e-2, "weight_decay": 0.05, **opts}
    if "adafactorbv" in name:
        kw_timm = {**timm_defaults, **kw, "momentum": 0.9}  # both factories pass momentum=0.9
    else:
        kw_timm = {**timm_defaults, **kw}
    ours, opt = _train(lambda p: do.create_optimizer_v2(p, name, **kw))
    theirs, _ = _train(lambda p: cls(p, **kw_timm))
    assert all(not torch.equal(a, b) for a, b in zip(ours, _start())), "a parameter did not move"
    for key, want in timm_defaults.items():
        assert opt.param_groups[0][key] == want, (name, key)
    if opts:  # the factored paths were taken: conv (dim 0 largest) and fc1 (dim 0 second)
        conv, fc1 = opt.param_groups[0]["params"][0], opt.param_groups[0]["params"][5]
        assert opt.state[conv]["exp_avg_sq_r"].shape == (1, 3, 3, 3)
        assert opt.state[fc1]["exp_avg_sq_c"].shape == (1, 32)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"{name} param {i}: {m}"
        )


def test_adafactor_bv_signature_is_timms():
    timm_cls = _timm_class("adafactorbv")
    ours = inspect.signature(do.AdafactorBigVision).parameters
    theirs = inspect.signature(timm_cls).parameters
    assert list(ours) == list(theirs)
    for n, p in theirs.items():
        assert ours[n].kind == p.kind and ours[n].default == p.default, n


def test_factored_dims_pick_the_two_largest():
    assert factored_dims((16, 32), 16) == (0, 1)  # dim 0 second largest
    assert factored_dims((32, 16), 16) == (1, 0)  # dim 0 largest
    assert factored_dims((2, 9, 5), 3) == (2, 1)  # dim 0 in neither
    assert factored_dims((4, 4), 4) == (0, 1)  # ties: the lower index is the "smaller"
    assert factored_dims((32, 15), 16) is None and factored_dims((30,), 1) is None


def test_bad_options_are_refused():
    p = [nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="momentum_dtype"):
        do.AdafactorBigVision(p, momentum_dtype="int8")
    with pytest.raises(ValueError, match="positive max lr"):
        do.AdafactorBigVision(p, lr=0.0, corrected_weight_decay=True)
    with pytest.raises(ValueError, match="beta2_cap"):
        do.AdafactorBigVision(p, beta2_cap=1.5)
    with pytest.raises(ValueError, match="transformers_order"):
        do.AdamW(p, caution=True, transformers_order=True)


# shapes whose factoring involves dim 0 as the second largest, the largest, and not at all
SIM_SHAPES = [(5, 7), (7, 5), (2, 9, 5), (4, 3, 6), (11,)]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_factoring_equals_unsharded(world):
    kw = dict(lr=0.05, min_dim_size_to_factor=2, weight_decay=0.05, momentum_dtype="float32",
              clipping_threshold=0.5, caution=True)  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in SIM_SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SIM_SHAPES] for _ in range(4)]
    ref = [nn.Parameter(t.clone()) for t in init]
    opt = do.AdafactorBigVision(ref, **kw)
    sim = ShardedSim(lambda p: do.AdafactorBigVision(p, **kw), init, world)
    for gs in grads:
        for p, g in zip(ref, gs):
            p.grad = g.clone()
        opt.step()
        sim.set_grads(gs)
        sim.step()
    for k, (a, b) in enumerate(zip(ref, sim.gather())):
        torch.testing.assert_close(
            b, a.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"param {k}: {m}"
        )
        got = sim.gather_state(k)
        for name, value in opt.state[ref[k]].items():
            torch.testing.assert_close(
                got[name].reshape(value.shape).float(), value.float(), rtol=1e-5, atol=1e-6
            )
    assert [s[0] for s in sim.reductions_per_step] == [3] * 4  # statistics, update RMS, mask
