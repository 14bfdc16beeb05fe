"""The Muon family: parity with timm's and torch's Muon, and the cost of sharded Newton-Schulz.

Exactness of sharded training (ZeRO-1/2, FSDP2 at 2, 3 and 4 ranks, uneven rows, a rank that
owns nothing) runs through the case table (``tests/cases/muon.py``) in test_zero.py and
test_fsdp2.py; here: the peers at their default bf16 iteration, the owner assignment, and the
per-rank bounds of the issue: Newton-Schulz FLOPs <= 1.2 / W of the total and bytes beyond
DDP's <= 2 S (W - 1) / W (S: bytes of the orthogonalised gradients), counted at the API.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distopt
from distopt.optim import Muon
from distopt.optim._whole import assign_owners
from tests.dist import rank, run_distributed, world_size
from tests.references import load_timm_optim

STEPS = 20


class ConvNet(nn.Module):
    """Conv (no bias, before a norm), BatchNorm, Linear with bias, LayerNorm, a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)  # (8, 1, 3, 3): AdamW fallback
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        h = self.dw(torch.relu(self.bn(self.conv(x))))
        return self.fc2(torch.tanh(self.ln(self.fc1(h.flatten(1)))))


def _train(make, steps=STEPS, model_fn=ConvNet, seed=0):
    torch.manual_seed(seed)
    model = model_fn()
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randn(8, 6, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


# name -> timm factory defaults (timm's registry: nmuon = nesterov, adamuon = algo, ...)
TIMM_NAMES = {
    "muon": {},
    "nmuon": {"nesterov": True},
    "adamuon": {"algo": "adamuon"},
    "nadamuon": {"algo": "adamuon", "nesterov": True},
}
OPTIONS = [
    {"lr": 0.02, "weight_decay": 0.05},
    {
        "lr": 0.02,
        "conv_mode": "batched",
        "ns_coefficients": "polar_express",
        "adjust_lr_fn": "rms_to_rms",
    },
]


@pytest.mark.parametrize("opts", OPTIONS, ids=["wd", "batched-polar-rms"])
@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_matches_timm_muon(name, opts):
    mod = load_timm_optim("muon")
    if mod is None:
        pytest.skip("timm not installed")
    if name.startswith("ada") or name.startswith("nada"):
        opts = {
            **opts,
            "adjust_lr_fn": "match_rms_adamw" if "ns_coefficients" not in opts else "rms_to_rms",
        }
    kw = {**TIMM_NAMES[name], **opts, "momentum": 0.9}  # both factories pass momentum=0.9
    ours, opt = _train(lambda p: distopt.optim.create_optimizer_v2(p, name, **opts))
    theirs, _ = _train(lambda p: mod.Muon(p, **kw))
    moved = _train(lambda p: torch.optim.SGD(p, lr=0.0), steps=1)[0]
    assert any(not torch.equal(a, b) for a, b in zip(ours, moved))
    routed = [("momentum_buffer" in opt.state[p]) for p in opt.param_groups[0]["params"]]
    assert routed.count(True) == 3, routed  # conv, fc1, fc2 orthogonalised; the rest on AdamW
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"{name} param {i}: {m}"
        )


class Mats(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16, bias=False)
        self.b = nn.Linear(16, 8, bias=False)
        self.c = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_matches_torch_muon_on_matrices(adjust):
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")

    def run(make):
        torch.manual_seed(0)
        model = Mats()
        opt = make(model.parameters())
        g = torch.Generator().manual_seed(3)
        for _ in range(STEPS):
            x, y = torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    # torch's defaults: lr 1e-3, wd 0.1, nesterov, Jordan's coefficients, lr factor "original"
    ours = run(lambda p: Muon(p, lr=1e-2, weight_decay=0.1, nesterov=True, ns_coefficients="original",
                              adjust_lr_fn=adjust or "original"))  # fmt: skip
    theirs = run(lambda p: torch.optim.Muon(p, lr=1e-2, adjust_lr_fn=adjust))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_owner_assignment_is_balanced_and_deterministic():
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0, 2.0, 2.0]
    owners = assign_owners(costs, 4)
    assert owners == assign_owners(list(costs), 4)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(4)]
    assert sorted(loads) == [5.0, 5.0, 6.0, 8.0], loads  # greedy: 8 | 4+2 | 4+1 | 2+2+1
    assert assign_owners([1.0], 3) == [0]  # ranks 1 and 2 own nothing
    with pytest.raises(ValueError, match="Invalid algo"):
        Muon([nn.Parameter(torch.zeros(4, 4))], algo="adam")
    with pytest.raises(ValueError, match="rsqrt_in"):
        Muon([nn.Parameter(torch.zeros(4, 4))], adjust_lr_fn="rsqrt_in")  # AdaMuon's only
    with pytest.raises(ValueError, match="ns_coefficients"):
        Muon([nn.Parameter(torch.zeros(4, 4))], ns_coefficients="cubic")


# --------------------------------------------------------------------------- sharded cost


class Blocks(nn.Module):
    """Eight transformer-like matrices of four shapes, plus vectors (AdamW fallback)."""

    def __init__(self, d=24):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(2):
            self.layers.append(nn.Linear(d, 3 * d))
            self.layers.append(nn.Linear(3 * d, d))
            self.layers.append(nn.Linear(d, 4 * d))
            self.layers.append(nn.Linear(4 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        for i in range(0, len(self.layers), 2):
            x = x + self.layers[i + 1](torch.tanh(self.layers[i](self.norm(x))))
        return x


class Two(nn.Module):
    """Two matrices at four ranks: two ranks own nothing."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 9)
        self.b = nn.Linear(9, 5, bias=False)

    def forward(self, x):
        return torch.cat([self.b(torch.tanh(self.a(x[:, :10]))), x[:, 5:]], dim=1)


def _batch(t, d, n=8):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def _run_model(model, opt, steps, d, part=(0, 1), start=0):
    r, w = part
    for t in range(start, start + steps):
        x, y = _batch(t, d)
        n = x.shape[0] // w
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[r * n : (r + 1) * n]), y[r * n : (r + 1) * n]).backward()
        opt.step()


def _cost_worker(steps):
    from distopt.optim import _whole
    from tests.test_fsdp2 import _fully_shard

    out = {}
    for mode in ("zero1", "zero2", "fsdp2"):
        for name, cls, d in (("blocks", Blocks, 24), ("two", Two, 11)):
            torch.manual_seed(0)
            model = cls()
            mk = lambda p: Muon(p, lr=0.02, weight_decay=0.01, ns_dtype="float32")  # noqa: E731
            if mode == "fsdp2":
                smodel = _fully_shard(model)
                opt = mk(model.parameters())
            else:
                smodel, opt = distopt.shard(model, mk(model.parameters()), stage=int(mode[-1]))
            _run_model(
                smodel, opt, 2, d, (rank(), world_size())
            )  # layouts exchanged, state created
            with _whole.counting() as st:
                _run_model(smodel, opt, steps - 2, d, (rank(), world_size()), start=2)
                sent, local, total = st.sent_bytes, st.local_cost, st.total_cost
            params = {
                n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in model.named_parameters()
            }
            out[(mode, name)] = dict(
                sent=sent / (steps - 2), local=local, total=total, params=params
            )
    return out


@pytest.mark.distributed
def test_sharded_newton_schulz_cost_and_exactness_at_four_ranks():
    world, steps = 4, 6
    per_rank = run_distributed(_cost_worker, world, steps, timeout=600)
    for name, cls, d in (("blocks", Blocks, 24), ("two", Two, 11)):
        torch.manual_seed(0)
        model = cls()
        opt = Muon(model.parameters(), lr=0.02, weight_decay=0.01, ns_dtype="float32")
        _run_model(model, opt, steps, d)
        mats = [p for p in model.parameters() if p.dim() >= 2]
        s_bytes = sum(p.numel() * 4 for p in mats)
        for mode in ("zero1", "zero2", "fsdp2"):
            res = [r[(mode, name)] for r in per_rank]
            for r, got in enumerate(res):
                for n, p in model.named_parameters():
                    torch.testing.assert_close(got["params"][n], p.detach(), rtol=1e-5, atol=1e-6,
                                               msg=lambda m, w=f"{mode} {name} rank {r} {n}": f"{w}: {m}")  # fmt: skip
                bound = 2 * s_bytes * (world - 1) / world
                assert got["sent"] <= bound, (
                    f"{mode} {name} rank {r}: {got['sent']} B/step > {bound}"
                )
            assert sum(x["sent"] for x in res) > 0, "rows moved to owners and back"
            total = res[0]["total"]
            assert all(abs(x["total"] - total) < 1e-6 * total for x in res)
            loads = [x["local"] for x in res]
            assert abs(sum(loads) - total) < 1e-6 * total, (
                "every matrix orthogonalised exactly once"
            )
            if name == "blocks":
                assert max(loads) <= 1.2 * total / world, (
                    f"{mode}: NS load per rank {loads} of {total}"
                )
            else:
                assert sorted(loads)[:2] == [0.0, 0.0], (
                    f"{mode}: two ranks should own nothing: {loads}"
                )


def test_bench_traffic_counts_all_to_all_bytes_as_sent():
    from distopt.bench._collectives import CollectiveCounter

    c = CollectiveCounter()
    c.add("all_gather", 400)
    assert c.ring_bytes(4) == 300.0
    c.add("all_to_all", 120)  # Muon's rows to owners and back: counted as sent, no ring factor
    assert c.ring_bytes(4) == 420.0
