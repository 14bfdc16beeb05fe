"""The per-channel rule runner (distopt/optim/_rule_rows.py) and the projection's channel factors.

AdamP/SGDP run as: channel sums (``row_sums``), the projection decided on the device
(``channel_factors``), the element-wise update on ``w * factor`` (``update_rows``).  The maths
against the published rule is in test_optim (references and timm); here: the factors' decisions
against a direct float64 computation, eager chunking, layouts no view can express, the
one- (two- for AdamP) kernel per tensor form of unsharded tensors against the three-step form (traced, no C++
build), and (with
``DISTOPT_TEST_COMPILED`` set: cold compiles take minutes on a loaded machine) compiled equals
eager.
"""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch

import distopt.optim as do
from distopt.optim import _kernel as K
from distopt.optim._core import ParamView, StepContext
from distopt.optim._projection import channel_factors
from tests.optim_cases import CASES
from tests.problems import make_params, run_quadratic

IDS = ["adamp", "adamp-project-nesterov", "sgdp"]


@pytest.fixture
def kernel_mode():
    yield K.set_mode
    K.set_mode(None)


def _view(w, g):
    return ParamView(param=w, data=w, grad=g, shape=w.shape, sharded=False, state={})


def test_channel_factors_decide_channel_layer_or_none():
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(6, 40, generator=gen, dtype=torch.float64) for _ in range(3)]
    g = [torch.randn(6, 40, generator=gen, dtype=torch.float64) for _ in range(3)]
    # 0: every channel of g orthogonal to w's; 1: only the whole tensor; 2: neither
    g[0] = g[0] - w[0] * (g[0] * w[0]).sum(1, keepdim=True) / (w[0] * w[0]).sum(1, keepdim=True)
    g[1] = g[1] - w[1] * (g[1] * w[1]).sum() / (w[1] * w[1]).sum()
    g[1][0] += 0.5 * w[1][0]  # channel 0 far from orthogonal: the channel view fails
    g[1] = g[1] - w[1] * (g[1] * w[1]).sum() / (w[1] * w[1]).sum()
    u = [torch.randn(6, 40, generator=gen, dtype=torch.float64) for _ in range(3)]
    stats = [
        torch.stack([(a * a).sum(1), (b * b).sum(1), (a * b).sum(1), (a * c).sum(1)]).float()
        for a, b, c in zip(w, g, u)
    ]
    eps, rate, step, wd_ratio = 1e-8, 0.01, 0.5, 0.1
    views = [_view(a.float(), b.float()) for a, b in zip(w, g)]
    out = channel_factors(
        StepContext([], None), views, stats, delta=0.1, wd_ratio=wd_ratio, eps=eps,
        rates=[rate] * 3, steps=[step] * 3,
    )  # fmt: skip
    ch = (w[0] * u[0]).sum(1) / (w[0].norm(dim=1) + eps) ** 2
    ly = (w[1] * u[1]).sum() / (w[1].norm() + eps) ** 2
    expected = [
        1 - rate * wd_ratio + step * ch,
        (1 - rate * wd_ratio + step * ly).expand(6),
        torch.full((6,), 1 - rate, dtype=torch.float64),
    ]
    for i, (a, b) in enumerate(zip(out, expected)):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-9, msg=f"view {i}")
    assert not torch.allclose(out[0], out[0][0].expand(6))  # per-channel values, not one


@pytest.mark.parametrize("cid", IDS)
def test_eager_chunks_give_the_same_numbers(cid, kernel_mode, monkeypatch):
    case = next(c for c in CASES if c.id == cid)
    out = []
    for chunk in (K.EAGER_CHUNK, 4):
        monkeypatch.setattr(K, "EAGER_CHUNK", chunk)
        kernel_mode("eager")
        p = make_params()
        run_quadratic(case.make(p), p, 4, False)
        out.append(p)
    for a, b in zip(*out):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def _twins(make):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 4, 5, 6).permute(0, 2, 1, 3))  # no (3, 120) view
    b = torch.nn.Parameter(a.detach().contiguous().clone())
    for p in (a, b):
        p.grad = 0.3 + torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) * 0.01
    oa, ob = make([a]), make([b])
    for _ in range(2):
        oa.step()
        ob.step()
    return a, b


@pytest.mark.parametrize(
    "make",
    [
        lambda p: do.AdamP(p, lr=0.1, weight_decay=0.1, delta=5.0),
        lambda p: do.SGDP(p, lr=0.1, momentum=0.9, weight_decay=0.1, delta=5.0),
    ],
    ids=["adamp", "sgdp"],
)
def test_a_layout_no_view_expresses_is_updated(make, kernel_mode):
    kernel_mode("eager")
    a, b = _twins(make)
    assert not a.is_contiguous()
    moved = float((b.detach() - torch.randn(b.shape)).abs().sum())
    assert moved > 0 and not math.isnan(moved)
    torch.testing.assert_close(a.detach().contiguous(), b.detach(), rtol=0, atol=0)


@pytest.mark.skipif(
    not os.environ.get("DISTOPT_TEST_COMPILED") or not K._can_compile(torch.device("cpu")),
    reason="compiled runs only with DISTOPT_TEST_COMPILED set (cold compiles take minutes)",
)
@pytest.mark.parametrize("cid", IDS)
def test_compiled_equals_eager(cid, kernel_mode, caplog):
    case = next(c for c in CASES if c.id == cid)
    res = {}
    for mode in ("eager", "compile"):
        kernel_mode(mode)
        p = make_params()
        run_quadratic(case.make(p), p, 4, False)
        res[mode] = p
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "compiling" in r.getMessage()
    ], "a kernel fell back to eager"
    for a, b in zip(res["eager"], res["compile"]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=case.tol, atol=case.tol)


class _Traced:
    """A ``torch.compile`` backend that runs dynamo's graphs as traced (no C++ build)."""

    def __call__(self, gm, example_inputs):
        return gm.forward


@pytest.mark.skipif(not K._can_compile(torch.device("cpu")), reason="no C++ compiler")
@pytest.mark.parametrize("cid", ["adamp", "adamp-project-nesterov", "sgdp"])
def test_fused_kernel_equals_the_three_step_form(cid, kernel_mode, monkeypatch):
    """Unsharded tensors under compiled kernels take ONE kernel per tensor (channel sums,
    :func:`local_factors`, the update): ``once`` (SGDP: its last loop computes ``u`` from the
    momentum buffer as just stored; AdamP, ``u_once``: ``u`` computed once for the sums and
    the update); traced, they give the numbers of the three-step form (``row_sums``,
    ``channel_factors``, ``update_rows``, as sharded tensors take) and of eager.  ``mixed``:
    in one step, AdamP's tensors up to ``ONCE_MAX`` elements take ``once``, those up to
    ``SCRATCH_MAX`` two kernels (``store``: the states, ``u`` in a kept buffer and the channel
    sums; ``finish``: the factors, ``p`` from ``u``), larger ones ``fused``."""
    from distopt.optim import _rule_rows as RR

    monkeypatch.setattr(K, "BACKEND", _Traced())
    for mod in (K, RR):
        monkeypatch.setattr(mod, "_kernels", {})
        monkeypatch.setattr(mod, "_failed", set())
    case = next(c for c in CASES if c.id == cid)
    res, phases = {}, {}
    runs = (("eager", "eager"), ("fused", "compile"), ("mixed", "compile"), ("three", "compile"))
    for name, mode in runs:
        if name == "mixed":  # 7x5 (and 1x1) once, 13x6 store/finish, 4x3x3x3 fused
            monkeypatch.setattr(RR, "ONCE_MAX", 50)
            monkeypatch.setattr(RR, "SCRATCH_MAX", 100)
        if name == "three":
            monkeypatch.setattr(RR, "fusable", lambda views: False)
        kernel_mode(mode)
        before = set(RR._kernels)
        p = make_params()
        run_quadratic(case.make(p), p, 4, False)
        res[name] = p
        phases[name] = {k[1] for k in set(RR._kernels) - before if k[2]}
    two = cid.startswith("adamp")  # AdamP: u_once
    assert phases["fused"] == {"once"}, phases
    assert phases["mixed"] == ({"store", "finish", "fused"} if two else set()), phases
    assert phases["three"] == {"rows", "update"}, phases
    for other in ("eager", "mixed", "three"):
        for a, b in zip(res[other], res["fused"]):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=case.tol, atol=case.tol)


@pytest.mark.skipif(not K._can_compile(torch.device("cpu")), reason="no C++ compiler")
@pytest.mark.parametrize("name, buffers, loads", [("SGDP", 0, 3 + 2), ("AdamP", 1, 4 + 2)])
def test_one_kernel_reads_each_tensor_once_per_loop(name, buffers, loads, kernel_mode, monkeypatch):
    """Inductor's C++ for the one-kernel form: SGDP's first loop reads p, g and the momentum
    buffer and stores the buffer, its last reads p and the buffer where the first stored it
    (one in-place foreach copy of the states; with a ``copy_`` per state the last loop reads p, g
    and the old buffer again and stores both: 6 loads), no tensor-sized buffer per call; AdamP
    reads p, g, m, v, then p and ``u`` (one buffer per call, stored by the first loop:
    recomputing u in the last loop was slower)."""
    import re

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from distopt.optim import _rule_rows as RR

    for mod in (K, RR):
        monkeypatch.setattr(mod, "_kernels", {})
        monkeypatch.setattr(mod, "_failed", set())
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # generate, not a cache hit
    kernel_mode("compile")
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(48, 40, generator=gen))
    opt = getattr(do, name)([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.randn(48, 40, generator=gen)
    _, codes = run_and_get_code(opt.step)
    assert len(codes) == 1, "one kernel"
    found = re.findall(r"empty_strided_cpu\(\(s\d+, s\d+\)", codes[0])
    assert len(found) == buffers, codes[0]
    # whole vectors of the (rows, cols) tensors (the masked column tails load them again)
    vectors = (
        r"loadu\(\w+ \+ static_cast<int64_t>\(x1 \+ ks1\*x0\), static_cast<int64_t>\(16\)\)"
    )
    assert len(re.findall(vectors, codes[0])) == loads, codes[0]


class _Counting(_Traced):
    """:class:`_Traced`, counting the graphs dynamo hands over (one per compile)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.skipif(not K._can_compile(torch.device("cpu")), reason="no C++ compiler")
@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_single_row_tensors_share_the_kernel_and_project_as_one_vector(
    name, kernel_mode, monkeypatch
):
    """Single-row tensors (class token, position embedding) are regrouped into several rows
    in the one-kernel form, with the channel test off: ONE compiled kernel serves them and the
    matrices (no graph specialised to one row), and the numbers are eager's, where the single
    channel is the whole tensor (projected with the layer's threshold)."""
    from distopt.optim import _rule_rows as RR

    backend = _Counting()
    monkeypatch.setattr(K, "BACKEND", backend)
    for mod in (K, RR):
        monkeypatch.setattr(mod, "_kernels", {})
        monkeypatch.setattr(mod, "_failed", set())
    shapes = [(1, 6, 8), (1, 1, 48), (1, 5, 9), (7, 5)]
    kw = dict(lr=1e-2, weight_decay=0.1) if name == "AdamP" else dict(lr=1e-2, weight_decay=0.01)

    def run(mode, delta):
        kernel_mode(mode)
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = getattr(do, name)(ps, delta=delta, **kw)
        for _ in range(3):
            for i, p in enumerate(ps):
                r = torch.randn(p.shape, generator=gen).view(2 if i == 0 else 1, -1)
                w = p.detach().view(r.shape)
                # orthogonal to the whole tensor: the layer projection applies; tensor 0 in each
                # half (its regrouped rows): a channel test on those rows would pass too
                r = r - (r * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
                p.grad = r.view(p.shape) if i < 2 else torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in ps]

    fused = run("compile", 0.1)
    kernels = 1  # AdamP's once kernel (u_once), SGDP's fused kernel
    assert backend.graphs == kernels, f"{backend.graphs} graphs: a tensor was not regrouped"
    eager = run("eager", 0.1)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    unprojected = run("eager", 0.0)  # delta 0: nothing is projected
    assert not torch.allclose(eager[0], unprojected[0], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(eager[1], unprojected[1], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not K._can_compile(torch.device("cpu")), reason="no C++ compiler")
@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_kept_row_aliases_follow_replaced_values_and_states(name, kernel_mode, monkeypatch):
    """The one-kernel form keeps each tensor's ``(rows, cols)`` aliases across steps (values,
    states, and a gradient that stays the same tensor); a parameter whose ``.data`` or states
    are replaced (new memory, as ``load_state_dict`` or a user assignment gives) is updated in
    its new tensors, and a gradient written in place or moved to other memory (``set_``) is
    read where it is: the numbers of a twin optimizer whose tensors were never replaced and
    whose gradients are new tensors each step."""
    from distopt.optim import _rule_rows as RR

    monkeypatch.setattr(K, "BACKEND", _Traced())
    for mod in (K, RR):
        monkeypatch.setattr(mod, "_kernels", {})
        monkeypatch.setattr(mod, "_failed", set())
    kernel_mode("compile")
    kw = dict(lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 8), (5, 3, 3)]
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa, ob = getattr(do, name)(a, **kw), getattr(do, name)(b, **kw)
    for step in range(4):
        if step == 2:  # new memory for a's values and states
            for p in a:
                p.data = p.data.clone()
                st = oa.state[p]
                for k in [k for k, t in st.items() if torch.is_tensor(t) and t.dim() > 0]:
                    st[k] = st[k].clone()
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=gen)
            if step == 0:
                pa.grad = grad.clone()
            elif step == 3:  # the same gradient tensor on other memory
                pa.grad.set_(grad.clone())
            else:  # accumulated in place: the same tensor, new values
                pa.grad.copy_(grad)
            pb.grad = grad  # b: a new gradient tensor each step
        oa.step()
        ob.step()
    assert any(k[2] for k in RR._kernels), "the one-kernel form did not run"
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=0, atol=0)
        for k, t in ob.state[pb].items():
            torch.testing.assert_close(oa.state[pa][k], t, rtol=0, atol=0)
