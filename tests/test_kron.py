"""PSGD Kron: parity with timm's Kron under a shared seed, the shared random stream, resume.

Sharded exactness (ZeRO-1/2, FSDP2, hybrid) and single-process checkpoint round trips run
through the case table (``tests/cases/kron.py``).  Here: timm parity by name (kron, kronw,
kronc) on a model with conv, linear, norm and bias parameters; the stream's state in the
state_dict; a run saved under ZeRO-2 at 3 ranks and resumed under FSDP2 at 2 ranks and on one
process equals the straight run; and the negative control: ranks drawing from streams with
different seeds (what a per-rank global RNG would do) no longer match single-process training.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distopt
import distopt.checkpoint as ckpt
from distopt.optim import Kron
from distopt.optim._param_groups import param_groups_weight_decay
from tests.cases.kron import timm_kron
from tests.dist import run_distributed
from tests.modes import build, full_params, train_steps
from tests.references import load_timm_optim

STEPS = 20
TIMM_DEFAULTS = {  # timm 1.0.31's registry
    "kron": {},
    "kronw": {"decoupled_decay": True},
    "kronc": {"decoupled_decay": True, "corrected_weight_decay": True},
}


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)  # small: timm's einsum without opt_einsum is outer products
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(27, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.ln(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)))))


def _train(make, steps=STEPS):
    torch.manual_seed(0)
    model = ConvNet()
    opt = make(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("name", list(TIMM_DEFAULTS))
def test_matches_timm_kron_under_a_shared_seed(name):
    if load_timm_optim("kron") is None:
        pytest.skip("timm not installed")
    kw = {"lr": 1e-2, "weight_decay": 0.05}
    opts = {"preconditioner_update_probability": 0.5} if name == "kronc" else {}

    def theirs(seed):
        return lambda m: timm_kron(
            param_groups_weight_decay(m, kw["weight_decay"]), seed=seed, lr=kw["lr"],
            momentum=0.9, **TIMM_DEFAULTS[name], **opts,
        )  # fmt: skip

    ours, opt = _train(lambda m: distopt.optim.create_optimizer_v2(m, name, **kw, **opts))
    want, _ = _train(theirs(1337))
    start, _ = _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.0), steps=1)
    assert len(opt.param_groups) == 2  # decay / no decay, as timm's factory groups them
    moved = [float((a - b).abs().max()) > 1e-3 for a, b in zip(ours, start)]
    assert moved.count(False) <= 1, moved  # the conv bias before BatchNorm has no gradient
    for i, (a, b) in enumerate(zip(ours, want)):
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"{name} param {i}: {m}"
        )
    if name != "kron":
        return
    # the draws matter: timm fed another stream ends elsewhere
    other, _ = _train(theirs(7))
    assert max(float((a - b).abs().max()) for a, b in zip(ours, other)) > 1e-4


@pytest.mark.parametrize("d", [7, 8, 15, 16, 33, 64])
def test_triangular_products_skip_the_zero_blocks_and_match_dense(monkeypatch, d):
    """``_tri_mm`` (triangular times dense, upper or lower), ``_triu_product`` (upper times
    upper) and ``_mode_product`` over a triangular factor, split into blocks (recursively, odd
    sizes too), give the dense products' values; the upper product's lower part is exactly zero."""
    from distopt.optim import _kron as KR

    monkeypatch.setattr(KR, "TRI_BLOCK", 4)
    g = torch.Generator().manual_seed(d)
    q = torch.triu(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.triu(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = torch.randn(d, 5, generator=g, dtype=torch.float64)
    t = torch.randn(3, d, 2, generator=g, dtype=torch.float64)
    calls = []
    real = KR._tri_mm
    monkeypatch.setattr(KR, "_tri_mm", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    torch.testing.assert_close(KR._tri_mm(q, x, True), q @ x)
    torch.testing.assert_close(KR._tri_mm(q.t(), x, False), q.t() @ x)
    prod = KR._triu_product(s, q)
    torch.testing.assert_close(prod, s @ q)
    assert bool((torch.tril(prod, -1) == 0).all())
    torch.testing.assert_close(KR._mode_product(t, q, 1), torch.einsum("ij,ajb->aib", q, t))
    torch.testing.assert_close(
        KR._mode_product(t, q, 1, transpose=True), torch.einsum("ji,ajb->aib", q, t)
    )
    assert (max(calls) > min(calls)) == (d >= 8)  # split into blocks from twice TRI_BLOCK on


def test_blocked_triangular_products_train_as_the_dense_ones(monkeypatch):
    """Kron with its triangular products split into blocks down to 4 (every factor of the
    model's linear layers blocked) trains as with dense products (20 steps, 1e-5)."""
    from distopt.optim import _kron as KR

    def make(m):
        return distopt.optim.create_optimizer_v2(m, "kron", lr=1e-2, weight_decay=0.05)

    monkeypatch.setattr(KR, "TRI_BLOCK", 10**9)
    dense, _ = _train(make)
    monkeypatch.setattr(KR, "TRI_BLOCK", 4)
    blocked, _ = _train(make)
    for a, b in zip(blocked, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_signature_and_bad_input():
    import inspect

    from tests.test_facades import _assert_same_signature, _timm_def

    if load_timm_optim("kron") is None:
        pytest.skip("timm not installed")
    _assert_same_signature(Kron.__init__, _timm_def("kron.py", "Kron"), "Kron", allow_extra=True)
    assert inspect.signature(Kron).parameters["seed"].kind is inspect.Parameter.KEYWORD_ONLY
    p = [nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="memory_save_mode"):
        Kron(p, memory_save_mode="some_diag")
    with pytest.raises(ValueError, match="preconditioner_update_probability"):
        Kron(p, preconditioner_update_probability=0.0)
    with pytest.raises(ValueError, match="precond_dtype"):
        Kron(p, precond_dtype=torch.int32)
    with pytest.raises(ValueError, match="momentum"):
        Kron(p, momentum=1.0)
    opt = Kron(p)
    del opt.param_groups[0]["kron_rng_state"]
    p[0].grad = torch.ones(3, 3)
    with pytest.raises(RuntimeError, match="kron_rng_state"):
        opt.step()


def test_stream_state_travels_with_the_state_dict():
    _, opt = _train(lambda m: Kron(m.parameters(), lr=1e-2), steps=3)
    fresh = Kron([nn.Parameter(torch.zeros(2))])
    saved = copy.deepcopy(opt.state_dict())
    state = saved["param_groups"][0]["kron_rng_state"]
    assert not torch.equal(state, fresh.param_groups[0]["kron_rng_state"]), (
        "the stream did not advance"
    )
    gen = torch.Generator()
    gen.set_state(state)
    nxt = torch.rand(3, generator=gen)
    gen.set_state(opt.param_groups[0]["kron_rng_state"])
    assert torch.equal(torch.rand(3, generator=gen), nxt)
    st = opt.state[next(iter(opt.state))]
    assert set(st) == {"step", "update_counter", "momentum_buffer", "kron_factors"}


# --------------------------------------------------------------------------- distributed


def _make(seed_by_rank=False):
    def make(params):
        seed = 1337
        if seed_by_rank and torch.distributed.is_initialized():
            seed += torch.distributed.get_rank()
        return Kron(params, lr=3e-3, weight_decay=0.05, seed=seed)

    return make


N, K = 8, 4


def _save_worker(root):
    model, opt, raw = build("zero2", _make())
    train_steps(model, opt, 0, N)
    straight = full_params(raw)
    model, opt, raw = build("zero2", _make())
    train_steps(model, opt, 0, K)
    ckpt.save(root, model=model, optimizer=opt)
    model, opt, raw = build("zero2", _make(seed_by_rank=True))
    train_steps(model, opt, 0, K)
    return straight, full_params(raw)


def _load_worker(mode, root):
    model, opt, raw = build(mode, _make())
    ckpt.load(root, model=model, optimizer=opt)
    train_steps(model, opt, K, N)
    return full_params(raw)


@pytest.mark.distributed
def test_sharded_resume_across_world_sizes_and_negative_control(tmp_path):
    root = str(tmp_path / "kron")
    saved = run_distributed(_save_worker, 3, root, timeout=600)
    model, opt, raw = build("single", _make())
    train_steps(model, opt, 0, N)
    single = full_params(raw)
    straight, broken = saved[0]
    for name, want in single.items():
        torch.testing.assert_close(straight[name], want, rtol=1e-5, atol=1e-6)
    model, opt, raw = build("single", _make())
    train_steps(model, opt, 0, K)
    diffs = [float((broken[n] - w).abs().max()) for n, w in full_params(raw).items()]
    assert max(diffs) > 1e-5, (
        "per-rank seeds should break exactness (the test must be able to fail)"
    )
    resumed = run_distributed(_load_worker, 2, "fsdp2", root, timeout=600)
    resumed.append(_load_worker("single", root))
    for r, got in enumerate(resumed):
        for name, want in straight.items():
            torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-7,
                                       msg=lambda m, r=r, n=name: f"resumed run {r} {n}: {m}")  # fmt: skip
