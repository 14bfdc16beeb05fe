"""The trust-ratio rules' kernel shapes (distopt/optim/_rule_trust.py, lamb.py, lars.py).

What the graphs handed to ``torch.compile``'s backend contain, seen with a backend that runs
them as traced (no C++ build): Lamb's fused sums+update kernel computes ``sqrt(v)`` once per
element (its update takes m, v and u from the sums phase), and per-tensor factors pass through
``once`` (a reduction, computed once per call).  Numbers against eager: tests/test_kernels.py.
The gradient sums of squares (Lamb's clip norm, NvNovoGrad's norms: BLAS dots for large
gradients at 1 thread) against the plain sums and against timm on a tensor large enough to take the dot.
"""

from __future__ import annotations

import os

import pytest
import torch

import distopt.optim as do
from distopt.optim import _kernel as K
from distopt.optim import _kernel_compile as KC
from distopt.optim._rule_trust import once


class _Graphs:
    """A ``torch.compile`` backend that keeps every captured graph and runs it as traced."""

    def __init__(self):
        self.gms = []

    def __call__(self, gm, example_inputs):
        self.gms.append(gm)
        return gm.forward


def _calls(gm, name: str, min_dim: int) -> int:
    """Nodes of ``gm`` calling ``name`` (function or method) whose result has >= ``min_dim`` dims
    (the rule's own: not the nodes the backend's scalar hoisting adds, marked ``HOISTED``)."""
    count = 0
    for node in gm.graph.nodes:
        if node.meta.get(KC.HOISTED):
            continue
        target = getattr(node.target, "__name__", node.target)
        if node.op in ("call_function", "call_method") and target == name:
            val = node.meta.get("example_value")
            if isinstance(val, torch.Tensor) and val.dim() >= min_dim:
                count += 1
    return count


@pytest.fixture
def graphs(monkeypatch):
    backend = _Graphs()
    monkeypatch.setattr(K, "BACKEND", backend)
    monkeypatch.setattr(K, "_kernels", {})
    monkeypatch.setattr(K, "_failed", set())
    K.set_mode("compile")
    yield backend
    K.set_mode(None)


def _step(make, steps: int = 2):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40000))  # one large tensor: one fused kernel call
    opt = make([p])
    for _ in range(steps):
        p.grad = torch.randn(p.shape)
        opt.step()
    return p


@pytest.mark.skipif(not K._can_compile(torch.device("cpu")), reason="no C++ compiler")
def test_lamb_fused_kernel_computes_its_direction_once(graphs):
    p = _step(lambda ps: do.Lamb(ps, weight_decay=0.01))
    assert len(graphs.gms) == 1, "one fused sums+update graph for one large tensor"
    gm = graphs.gms[0]
    # one element-wise sqrt(v) and one division by it; the sums phase's u feeds the update
    assert _calls(gm, "sqrt", 1) == 1, gm.code
    assert _calls(gm, "truediv", 1) + _calls(gm, "div", 1) == 1, gm.code
    # the trust ratio goes through once(): a 16-wide max over its copies
    assert _calls(gm, "amax", 0) == 1, gm.code
    assert torch.isfinite(p).all()


@pytest.mark.skipif(not K._can_compile(torch.device("cpu")), reason="no C++ compiler")
def test_lamb_fused_kernel_stores_u_and_nothing_else(monkeypatch):
    """Inductor's C++ for Lamb's fused kernel allocates ONE tensor-sized buffer per call (u,
    stored in the sums loop, read by the update), not m' and v' scratch buffers with u recomputed
    (the shape one more scalar read in the sums loop once tipped it into: 56 instead of 44 B per
    element)."""
    import re

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(K, "_kernels", {})
    monkeypatch.setattr(K, "_failed", set())
    K.set_mode("compile")
    try:
        with inductor_config.patch(fx_graph_cache=False):  # generate the code, not a cache hit
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(40000))
            opt = do.Lamb([p], weight_decay=0.01)
            p.grad = torch.randn(40000)
            _, codes = run_and_get_code(opt.step)
    finally:
        K.set_mode(None)
    assert len(codes) == 1, "one fused kernel"
    assert len(re.findall(r"empty_strided_cpu\(\(s\d+, \)", codes[0])) == 1, codes[0]


@pytest.mark.skipif(not K._can_compile(torch.device("cpu")), reason="no C++ compiler")
def test_lars_trust_factor_goes_through_once(graphs):
    _step(lambda ps: do.Lars(ps, weight_decay=0.01, momentum=0.9))
    assert len(graphs.gms) == 1
    assert _calls(graphs.gms[0], "amax", 0) == 1, graphs.gms[0].code


@pytest.mark.parametrize("shape", [(), (5, 1)])
def test_once_is_the_value(shape):
    x = torch.randn(shape, dtype=torch.float64)
    y = once(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, x)
    nan = once(torch.tensor(float("nan")))
    assert torch.isnan(nan)


@pytest.fixture
def one_thread():
    """torch at 1 thread (the dot path of grad_sq_sums), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_grad_sq_sums_are_the_squared_norms(threads, monkeypatch):
    """Large float32 gradients (BLAS dots at 1 thread only) and the rest (one _foreach_norm):
    each ||g||^2."""
    from distopt.optim._rule_trust import DOT_MIN, grad_sq_sums

    torch.manual_seed(0)
    grads = [
        torch.randn(DOT_MIN + 5),  # dot
        torch.randn(300),  # foreach
        torch.randn(2 * DOT_MIN, 2)[:, 0],  # large but strided: foreach
        torch.randn(64, DOT_MIN // 32) * 3.0,  # 2-d, dot
    ]
    dots = []
    real_dot = torch.dot
    monkeypatch.setattr(torch, "dot", lambda a, b: dots.append(a) or real_dot(a, b))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = grad_sq_sums(grads)
    finally:
        torch.set_num_threads(before)
    assert len(dots) == (2 if threads == 1 else 0)  # MKL's threaded dot is avoided
    assert len(got) == len(grads)
    for g, s in zip(grads, got):
        want = g.double().square().sum()
        assert s.dim() == 0 and s.dtype == torch.float32
        torch.testing.assert_close(s.double(), want, rtol=1e-5, atol=0.0)
    # other dtypes: _foreach_norm's norm in that dtype, squared in float32 (as timm's clip norm)
    low = torch.randn(DOT_MIN).to(torch.bfloat16)
    (s,) = grad_sq_sums([low])
    assert torch.equal(s, torch.linalg.vector_norm(low).float().square())


def _equals_timm(name: str, ours_cls, timm_cls: str, kw: dict, grad_of) -> None:
    """``ours_cls`` (eager) and timm's ``timm_cls`` from module ``name``, both built with ``kw``,
    on a 40000-element tensor (its sums of squares from a dot) and a (30, 10) one (from
    ``_foreach_norm``): equal after 3 steps whose gradients are ``grad_of(shape, step)``."""
    from tests.references import load_timm_optim

    mod = load_timm_optim(name)
    if mod is None:
        pytest.skip("timm not installed")
    torch.manual_seed(0)
    shapes = [(40000,), (30, 10)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    K.set_mode("eager")
    try:
        a = ours_cls(ours, **kw)
        b = getattr(mod, timm_cls)(ref, **kw)
        for step in range(3):
            for p, q in zip(ours, ref):
                p.grad = grad_of(p.shape, step)
                q.grad = p.grad.clone()
            a.step()
            b.step()
    finally:
        K.set_mode(None)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5)


def test_lamb_clip_norm_of_large_gradients_equals_timm(one_thread):
    """Lamb (eager, clipping active: ||g|| ~ 400 >> max_grad_norm) on a tensor whose clip-norm
    share comes from a dot and one from _foreach_norm equals timm's Lamb.  A large eps makes the
    update depend on the clip factor (with a tiny one Lamb is almost invariant to it)."""
    kw = dict(lr=1e-2, eps=1e-2, weight_decay=0.05, max_grad_norm=1.0)
    _equals_timm("lamb", do.Lamb, "Lamb", kw, lambda shape, step: torch.randn(shape) * 2.0)


def _sparse_grad(shape, step):
    """A gradient with 100 non-zeros, growing with the step: with a large lr, a wrong
    ||g||^2 moves NvNovoGrad's update above the tolerance."""
    g = torch.randn(shape) * (step + 1.0)
    g.view(-1)[100:] = 0.0
    return g


def test_nvnovograd_norms_of_large_gradients_equal_timm(one_thread):
    """NvNovoGrad (eager) on a tensor whose ||g||^2 comes from a dot (squared_norms) and one from
    _foreach_norm equals timm's NvNovoGrad (the update divides g by sqrt of that sum; gradients
    with few non-zeros and a large lr make a wrong sum visible above the tolerance)."""

    _equals_timm(
        "nvnovograd", do.NvNovoGrad, "NvNovoGrad", dict(lr=0.1, weight_decay=0.05), _sparse_grad
    )


@pytest.fixture
def native(monkeypatch):
    """The native sum-of-squares loop (distopt/optim/_sqsum.py) built (compiled mode) and then
    used whatever the kernel mode; skipped where it cannot be built."""
    from distopt.optim import _sqsum

    K.set_mode("compile")
    try:
        ok = _sqsum.available()
    finally:
        K.set_mode(None)
    if not ok:
        pytest.skip("the native sum-of-squares loop cannot be built here")
    monkeypatch.setattr(_sqsum, "available", lambda: True)
    return _sqsum


def test_native_sq_sums_are_the_float64_sums(native):
    """Every size (empty, under one block, one block of 8 x 16, odd tails, large): the float64
    sum of squares; what the loop cannot read (other dtypes, strided, not a tensor) is refused."""
    torch.manual_seed(0)
    xs = [torch.randn(n) * 3.0 for n in (0, 1, 5, 127, 128, 129, 1000, 40003)]
    xs.append(torch.randn(64, 513))
    xs.append(torch.randn(10, 20)[2:5])  # a contiguous slice: its own offset
    got = native.sq_sums(xs)
    assert got.dtype == torch.float64 and got.shape == (len(xs),)
    want = torch.stack([x.double().square().sum() for x in xs])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    ptrs, sizes = native.addresses(xs)  # what grad_norm hands to the loop
    assert list(ptrs) == [x.data_ptr() for x in xs] and list(sizes) == [x.numel() for x in xs]
    torch.testing.assert_close(native._sums(xs, (ptrs, sizes)), want, rtol=1e-12, atol=0.0)
    for bad in (torch.randn(8).to(torch.bfloat16), torch.randn(8, 2)[:, 0], [1.0]):
        with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
            native.sq_sums([torch.randn(4), bad])
        assert native.addresses([torch.randn(4), bad]) is None


def test_native_sq_sums_are_the_same_at_every_thread_count(native):
    """At more than one thread the tensors are shared out among OpenMP's threads, each sum
    still one thread's: bitwise the 1-thread sums (and the float64 sums); the library brings no
    OpenMP runtime of its own into the process (one libgomp mapped: torch's)."""
    torch.manual_seed(2)
    xs = [torch.randn(n) for n in (40003, 0, 7, 300000, 129, 65536, 1000, 5)] * 3
    before = torch.get_num_threads()
    got = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got[n] = native.sq_sums(xs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[1], got[2]) and torch.equal(got[1], got[3])
    want = torch.stack([x.double().square().sum() for x in xs])
    torch.testing.assert_close(got[2], want, rtol=1e-12, atol=0.0)
    try:
        with open("/proc/self/maps") as f:
            gomps = {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        return
    assert len(gomps) <= 1, gomps


def test_grad_sq_sums_take_the_native_loop_for_what_it_reads(native, monkeypatch):
    """grad_sq_sums with the native loop: one call for the float32 contiguous gradients, the
    others as before (here: a strided and a bfloat16 one), every sum in its place."""
    from distopt.optim._rule_trust import grad_norm, grad_sq_sums

    torch.manual_seed(1)
    grads = [torch.randn(40000), torch.randn(600, 2)[:, 0], torch.randn(300) * 2.0]
    grads.append(torch.randn(77).to(torch.bfloat16))
    calls = []
    real = native._sums
    monkeypatch.setattr(native, "_sums", lambda ts, *a: calls.append(len(ts)) or real(ts, *a))
    got = grad_sq_sums(grads, torch.float64)
    assert calls == [2], "the two float32 contiguous gradients in one native call"
    for i, (g, s) in enumerate(zip(grads, got)):
        assert s.dim() == 0 and s.dtype == torch.float64
        if i == 3:  # bfloat16: _foreach_norm's norm in bfloat16, squared (as before)
            assert torch.equal(s, torch.linalg.vector_norm(g).double().square())
            continue
        # the native sums are float64 sums of the squares; the strided one a float32 norm
        want = g.double().square().sum()
        torch.testing.assert_close(s, want, rtol=1e-12 if i in (0, 2) else 1e-5, atol=0.0)

    class _View:  # what grad_norm reads of a ParamView
        def __init__(self, g):
            self.grad, self.sharded = g, False

    views = [_View(g) for g in grads[:1] + grads[2:3]]
    calls.clear()
    norm = grad_norm(None, views)
    assert calls == [2] and norm.dtype == torch.float32
    want = (grads[0].double().square().sum() + grads[2].double().square().sum()).sqrt()
    torch.testing.assert_close(norm.double(), want, rtol=1e-6, atol=0.0)


def test_lamb_with_the_native_clip_norm_equals_timm(native):
    """As test_lamb_clip_norm_of_large_gradients_equals_timm, the clip norm from the native loop."""
    kw = dict(lr=1e-2, eps=1e-2, weight_decay=0.05, max_grad_norm=1.0)
    _equals_timm("lamb", do.Lamb, "Lamb", kw, lambda shape, step: torch.randn(shape) * 2.0)


def test_nvnovograd_with_native_norms_equals_timm(native):
    """As test_nvnovograd_norms_of_large_gradients_equal_timm, the norms from the native loop."""

    _equals_timm(
        "nvnovograd", do.NvNovoGrad, "NvNovoGrad", dict(lr=0.1, weight_decay=0.05), _sparse_grad
    )


def test_native_loop_that_cannot_be_built_leaves_the_torch_path(monkeypatch, caplog):
    """A compiler that fails: one warning, available() False, the norms from torch ops."""
    from distopt.optim import _sqsum
    from distopt.optim._rule_trust import grad_sq_sums

    monkeypatch.setattr(_sqsum, "_state", "")
    monkeypatch.setattr(_sqsum, "_lib", None)
    monkeypatch.setattr(_sqsum, "_compiler", lambda: "false")  # exits 1 on --version
    K.set_mode("compile")
    try:
        with caplog.at_level("WARNING", logger="distopt.optim._sqsum"):
            assert not _sqsum.available()
            assert not _sqsum.available()
        g = torch.randn(1000)
        (s,) = grad_sq_sums([g])
    finally:
        K.set_mode(None)
    assert sum("native sum-of-squares" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(s.double(), g.double().square().sum(), rtol=1e-5, atol=0.0)
    with pytest.raises(RuntimeError, match="not available"):
        _sqsum.sq_sums([g])


def test_native_loop_whose_openmp_build_fails_is_built_serial(monkeypatch, tmp_path):
    """Where the OpenMP build fails (here: a flag the compiler refuses), the serial build is
    used: available(), the same sums at 2 threads, no warning."""
    from distopt.optim import _sqsum

    if _sqsum._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("DISTOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_sqsum, "_state", "")
    monkeypatch.setattr(_sqsum, "_lib", None)
    monkeypatch.setattr(_sqsum, "_openmp", lambda version: True)
    monkeypatch.setattr(_sqsum, "_OPENMP", ("-fno-such-option-distopt",))
    K.set_mode("compile")
    before = torch.get_num_threads()
    try:
        assert _sqsum.available()
        torch.set_num_threads(2)
        xs = [torch.randn(n) for n in (1000, 40003, 3)]
        got = _sqsum.sq_sums(xs)
    finally:
        torch.set_num_threads(before)
        K.set_mode(None)
    built = [f for f in os.listdir(tmp_path) if f.endswith(".so")]
    assert len(built) == 1, built  # the serial build only
    want = torch.stack([x.double().square().sum() for x in xs])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


def test_native_loop_cache_directory(monkeypatch, tmp_path):
    """$DISTOPT_CACHE_DIR, else inside $TORCHINDUCTOR_CACHE_DIR (a cold inductor cache is a
    cold native build too), else $XDG_CACHE_HOME/distopt."""
    from distopt.optim import _sqsum

    monkeypatch.setenv("DISTOPT_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "ind"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _sqsum._cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("DISTOPT_CACHE_DIR")
    assert _sqsum._cache_dir() == str(tmp_path / "ind" / "distopt")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert _sqsum._cache_dir() == str(tmp_path / "xdg" / "distopt")
