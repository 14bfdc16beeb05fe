"""The optimizer rules of distopt/optim/_kernel.py: compiled equals eager; GradScaler skips steps.

CI runs every test process with ``DISTOPT_KERNELS=eager`` (tests/conftest.py): compiling kernels
in each spawned process would cost minutes.  The compiled path is covered here, in one process:
by default one case that takes every path of the runner (a two-phase cautious rule, small
tensors grouped, large ones alone); ``DISTOPT_TEST_COMPILED=all`` runs the whole case table
compiled against eager (minutes: one cold compile per rule and option set).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys

import pytest
import torch

from distopt.optim import _kernel as K
from tests.optim_cases import CASES
from tests.problems import make_params, run_quadratic

_COMPILED_IDS = {"csgdw", "madgrad"}  # madgrad: K.cbrt's bit casts


def _amp_cases():
    out = []
    for c in CASES:
        opt = c.make([torch.nn.Parameter(torch.zeros(2))])
        if getattr(type(opt), "_step_supports_amp_scaling", False) and not c.create_graph:
            out.append(c)
    return out


AMP = _amp_cases()


def _compiled_cases():
    if os.environ.get("DISTOPT_TEST_COMPILED") == "all":
        return [c for c in CASES if not c.create_graph]
    return [c for c in CASES if c.id in _COMPILED_IDS]


@pytest.fixture
def kernel_mode():
    yield K.set_mode
    K.set_mode(None)


def test_mode_validation(monkeypatch, kernel_mode):
    with pytest.raises(ValueError, match="compile"):
        kernel_mode("fast")
    monkeypatch.setenv(K.ENV, "turbo")
    with pytest.raises(ValueError, match="DISTOPT_KERNELS"):
        K.mode()
    monkeypatch.setenv(K.ENV, "eager")
    assert K.mode() == "eager"


@pytest.mark.skipif(
    not K._can_compile(torch.device("cpu")), reason="no C++ compiler for torch.compile"
)
@pytest.mark.parametrize("case", _compiled_cases(), ids=lambda c: c.id)
def test_compiled_equals_eager(case, kernel_mode, caplog):
    # big enough that one tensor is not grouped with the small ones
    shapes = [(300, 130), (7,), (5, 3), (1,)]
    results = {}
    for mode in ("eager", "compile"):
        kernel_mode(mode)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = case.make(params)
        for step in range(4):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results[mode] = [p.detach().clone() for p in params]
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "compiling" in r.getMessage()
    ]
    for a, b in zip(results["eager"], results["compile"]):
        torch.testing.assert_close(a, b, rtol=case.tol, atol=case.tol)
    moved = [float((a - torch.randn(a.shape)).abs().sum()) for a in results["eager"]]
    assert all(m > 0 for m in moved)


# one big 1-, 2- and 4-d tensor each (one kernel call each), small ones grouped into one call,
# one at a storage offset (as ZeRO's row shards are), a 1-element one (eager)
_TRACE_SHAPES = [(40000,), (300, 130), (8, 3, 40, 40), (7,), (5, 3), (1,)]


def _offset_params():
    flat = torch.randn(sum(torch.Size(s).numel() for s in _TRACE_SHAPES) + 3 * len(_TRACE_SHAPES))
    params, at = [], 1
    for s in _TRACE_SHAPES:
        n = torch.Size(s).numel()
        params.append(torch.nn.Parameter(flat[at : at + n].view(s)))
        at += n + 3
    return params


def _rules_of(case) -> tuple:
    """The rule functions ``case``'s optimizer runs through :func:`K.apply` (one eager step)."""
    calls = []
    real, previous = K.apply, K._mode

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    K.apply, K._mode = spy, "eager"
    try:
        case.make([p]).step()
    finally:
        K.apply, K._mode = real, previous
    return tuple(dict.fromkeys(calls))


def _trace_cases():
    """CI: the first case of every rule function (tracing costs seconds of CPU per case);
    ``DISTOPT_TEST_COMPILED=all``: every case that runs rules."""
    every = os.environ.get("DISTOPT_TEST_COMPILED") == "all"
    seen, out = set(), []
    for c in CASES:
        if c.create_graph:
            continue
        rules = _rules_of(c)
        if rules and (every or not set(rules) <= seen):
            out.append(c)
        seen.update(rules)
    return out


class _CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph as it is and counts graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("case", _trace_cases(), ids=lambda c: c.id)
def test_every_rule_traces_once_and_equals_eager(case, kernel_mode, monkeypatch, caplog):
    """Every case whose optimizer runs rules: each (rule, options, phase) traces as ONE
    full graph (dynamo's ``aot_eager`` backend: the graphs inductor would get, without building
    C++) that serves 1-, 2- and 4-d tensors, grouped small ones and views at storage offsets
    without recompiling, and gives eager's numbers; in-place updates bump version counters."""
    backend = _CountingBackend()
    monkeypatch.setattr(K, "BACKEND", backend)
    # every runner of rules (_kernel and the row-wise one, if loaded): fresh code objects
    runners = [K] + [m for m in (sys.modules.get("distopt.optim._rule_rows"),) if m]
    for mod in runners:
        monkeypatch.setattr(mod, "_kernels", {})
        monkeypatch.setattr(mod, "_failed", set())

    def steps(params, opt):
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    results = {}
    for mode in ("eager", "compile"):
        kernel_mode(mode)
        torch.manual_seed(0)
        params = _offset_params()
        opt = case.make(params)
        versions = [p._version for p in params]
        steps(params, opt)
        assert all(p._version > v for p, v in zip(params, versions)), "an update was invisible"
        results[mode] = [p.detach().clone() for p in params]
    failed = [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()]
    assert not failed, failed
    kernels = [k for mod in runners for k in mod._kernels if k[2]]  # (key, phase, compiled)
    assert kernels, f"{case.id}: nothing was compiled"
    assert backend.graphs == len(kernels), (
        f"{case.id}: {backend.graphs} graphs for {len(kernels)} (rule, options, phase) kernels: "
        "a kernel recompiled for another shape, rank, offset or grouping"
    )
    for a, b in zip(results["eager"], results["compile"]):
        torch.testing.assert_close(a, b, rtol=case.tol, atol=case.tol)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values on the host, except the CPU step counters (``skip``)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__bool__}  # fmt: skip

    def __init__(self, skip):
        super().__init__()
        self.skip, self.reads = skip, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and not any(a is s for a in args[:1] for s in self.skip):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _grads(params, step, scale):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale


@pytest.mark.parametrize("case", AMP, ids=lambda c: c.id)
def test_grad_scaler_skips_exactly_the_overflow_step(case):
    scale, bad = 2.0**14, 2
    ref = make_params()
    opt_ref = case.make(ref)
    for step in range(5):
        if step == bad:
            continue  # what a skipped step must be: nothing happens
        _grads(ref, step, 1.0)
        opt_ref.step()

    params = make_params()
    opt = case.make(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    reads = 0
    for step in range(5):
        scaler.scale(torch.ones(()))  # the scale is created by the first scale() call
        _grads(params, step, scaler.get_scale())  # as scaler.scale(loss).backward() leaves them
        if step == bad:
            params[0].grad.view(-1)[0] = float("inf")
        steps = [
            s
            for st in opt.state.values()
            for s in st.values()
            if isinstance(s, torch.Tensor) and s.dim() == 0
        ]
        with _HostReads(steps) as mode:
            scaler.step(opt)
        if step > 0:
            reads += len(mode.reads)
        scaler.update()
    assert scaler.get_scale() == scale / 2, "the overflow did not reach the scaler"
    assert reads == 0, f"{case.id}: values read back to the host during scaler.step: {mode.reads}"
    for p in opt.param_groups[0]["params"]:
        if "step" in opt.state[p]:
            assert float(opt.state[p]["step"]) == 4.0, "the skipped step was counted"
    for i, (a, b) in enumerate(zip(params, ref)):
        torch.testing.assert_close(
            a.detach(),
            b.detach(),
            rtol=1e-6,
            atol=1e-6,
            msg=lambda m, i=i: f"{case.id}: parameter {i}: {m}",
        )


def test_every_converted_element_wise_optimizer_supports_grad_scaler():
    names = {type(c.make([torch.nn.Parameter(torch.zeros(2))])).__name__ for c in AMP}
    assert {"AdaBelief", "SGD", "SGDW", "Lion", "Adan", "Adopt", "Adamax", "MADGRAD"} <= names


def test_run_quadratic_unchanged_by_chunking(kernel_mode, monkeypatch):
    """Eager mode works through big tensors in chunks: the same numbers as one call."""
    case = next(c for c in CASES if c.id == "adabelief")
    out = []
    for chunk in (K.EAGER_CHUNK, 4):
        monkeypatch.setattr(K, "EAGER_CHUNK", chunk)
        kernel_mode("eager")
        p = make_params()
        run_quadratic(case.make(p), p, 3, False)
        out.append(p)
    for a, b in zip(*out):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def test_bench_bytes_per_parameter_follow_the_state():
    """bench step's bytes/param: p read+written, g read, each state read+written (x0 read only),
    everything read once more for whole-tensor statistics."""
    import distopt.optim as do
    from distopt.bench._traffic import step_bytes, traffic

    def after_one_step(make):
        params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
        for p in params:
            p.grad = torch.randn(p.shape)
        opt = make(params)
        opt.step()
        return opt, params

    opt, params = after_one_step(lambda p: torch.optim.AdamW(p, fused=True))
    assert step_bytes(opt, params) == 4 * (3 + 2 * 2)
    opt, params = after_one_step(lambda p: do.MADGRAD(p))  # grad_sum_sq, s written; x0 read
    assert step_bytes(opt, params) == 4 * (3 + 2 * 2 + 1)
    opt, params = after_one_step(lambda p: do.Lamb(p))  # trust ratios: a statistics pass
    assert step_bytes(opt, params) == 4 * (2 * (2 + 2) + 1 + 2)
    row = traffic(opt, params, 1e-3)
    assert row["gbps"] == pytest.approx(row["bytes_per_param"] * 35 / 1e-3 / 1e9)
    # MARS's norm reads only g and last_grad (p, g, m, last_grad, v read; p, m, last_grad, v
    # written); with the cautious mask its statistics need the whole update
    opt, params = after_one_step(lambda p: do.Mars(p))
    assert step_bytes(opt, params) == 4 * (5 + 4 + 2)
    opt, params = after_one_step(lambda p: do.Mars(p, caution=True))
    assert step_bytes(opt, params) == 4 * (2 * 5 + 4)
    # SGDP: p, g, b read and p, b written, its channel sums read p and g once more (the
    # buffer's dots in the update's pass); cautious: everything again
    opt, params = after_one_step(lambda p: do.SGDP(p, lr=0.1, momentum=0.9))
    assert step_bytes(opt, params) == 4 * (3 + 2 + 2)
    opt, params = after_one_step(lambda p: do.SGDP(p, lr=0.1, momentum=0.9, caution=True))
    assert step_bytes(opt, params) == 4 * (2 * 3 + 2)
    # Adahessian's update (the Hessian-vector products belong to backward): p, g, m, v and the
    # kept estimate read, p, m, v written; no statistics pass
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
    opt = do.Adahessian(params, update_each=2)
    sum((p**3).sum() for p in params).backward(create_graph=True)
    opt.step()
    assert "hess" in opt.state[params[0]]
    assert step_bytes(opt, params) == 4 * (5 + 3)


# --------------------------------------------------------------------------- grouping (_kernel_plan)

from distopt.optim import _kernel_plan as P  # noqa: E402
from distopt.optim._core import ParamView, StepContext  # noqa: E402
from distopt.optim.lars import lars_rule  # noqa: E402

# a large tensor (alone), three equal-sized small ones and two more (stacked as rows when the
# rule has sums), one of another size (alone or concatenated), a 1-element one (eager)
_GROUP_SHAPES = [(40000,), (384,), (384,), (3, 128), (5, 3), (15,), (7,), (1,)]
_LARS = dict(lr=0.1, wd=0.01, trust_coeff=0.001, eps=1e-8, momentum=0.9, dampening=0.0)


def mixing_rule(p, g, st, s, *, phase="update"):
    """Lars-like, but the trust factor (float64) meets the float32 gradient uncast: with an
    (n, 1) column of statistics the product would be float64 maths, so no rows for it."""
    if phase == "sums":
        return {"w_sq": p * p, "g_sq": g * g}
    r = (s["w_sq"] / (s["g_sq"] + 1.0)).sqrt()
    return p - s["lr"] * g * r, {"momentum_buffer": st["momentum_buffer"] * s["momentum"] + g}


def _lars_steps(rule, compile_mode, sharded, steps=3):
    """``steps`` steps of ``rule`` through K.apply, every tensor's sums "reduced" by a fake
    reducer (doubled, as two ranks holding the same shard would give) when ``sharded``."""
    K.set_mode(compile_mode)
    torch.manual_seed(0)
    params = [torch.randn(s) for s in _GROUP_SHAPES]
    states = [{"momentum_buffer": torch.zeros(s)} for s in _GROUP_SHAPES]
    reductions = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        views = [
            ParamView(p, p, torch.randn(p.shape, generator=gen), p.shape, sharded, st)
            for p, st in zip(params, states)
        ]
        ctx = StepContext([None] if sharded else [], lambda flat, grp: flat.mul_(2.0))
        scalars = [dict(_LARS, first=float(step == 0)) for _ in views]
        K.apply(None, rule, views, ("momentum_buffer",), scalars, ctx=ctx, sums=("w_sq", "g_sq"),
                **({} if rule is mixing_rule else dict(adapt=True, trust_clip=False, momentum=True,
                                                       nesterov=False)))  # fmt: skip
        reductions.append(ctx.num_reductions)
    return params + [st["momentum_buffer"] for st in states], reductions


def _fresh_runner(monkeypatch, backend):
    """The runner with ``backend`` and empty caches (kernels, failed compiles, rows probes)."""
    monkeypatch.setattr(K, "BACKEND", backend)
    monkeypatch.setattr(K, "_kernels", {})
    monkeypatch.setattr(K, "_failed", set())
    monkeypatch.setattr(P, "_rows", {})
    return backend


@pytest.mark.parametrize("sharded", [False, True], ids=["local", "sharded"])
@pytest.mark.parametrize("rule", [lars_rule, mixing_rule], ids=["rows", "no-rows"])
def test_grouped_small_tensors_and_fused_sums_equal_eager(rule, sharded, kernel_mode, monkeypatch):
    """Small tensors with whole-tensor sums: equal-sized ones stacked as rows (when the probe
    allows: Lars casts its trust ratio, ``mixing_rule`` does not), the rest alone; unsharded, one
    ``fused`` call per unit, sharded, sums / one reduction / update.  Eager's numbers either way,
    one graph per kernel (no recompiles over steps, sizes or offsets)."""
    backend = _fresh_runner(monkeypatch, _CountingBackend())
    eager, red_eager = _lars_steps(rule, "eager", sharded)
    compiled, red_compiled = _lars_steps(rule, "compile", sharded)
    assert red_eager == red_compiled == ([1, 1, 1] if sharded else [0, 0, 0])
    phases = sorted({k[1] for k in K._kernels if k[2]})
    rows = rule is lars_rule
    assert P._rows == {(K._kernels and next(iter(K._kernels))[0], torch.float32): rows}
    want = ["sums", "update"] if sharded else ["fused"]
    assert phases == sorted(want + ([w + "_rows" for w in want] if rows else []))
    assert backend.graphs == len([k for k in K._kernels if k[2]])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_rows_probe_watches_float64_columns():
    """The probe: a rule whose statistics meet float32 tensors only after ``.to(dtype)`` gives
    the same numbers with (n, 1) columns; one that mixes them does not get rows."""
    sc = torch.tensor([_LARS[k] for k in _LARS] + [0.0], dtype=torch.float64)
    names = (*_LARS, "first")
    opts = dict(adapt=True, trust_clip=False, momentum=True, nesterov=False)
    lars = K._Kernels((lars_rule, ("momentum_buffer",), names, tuple(sorted(opts.items())),
                       ("w_sq", "g_sq")), True)  # fmt: skip
    mixing = K._Kernels((mixing_rule, ("momentum_buffer",), names, (), ("w_sq", "g_sq")), True)
    assert P._probe_rows(lars.key, torch.float32, sc)
    assert not P._probe_rows(mixing.key, torch.float32, sc)
    assert P._probe_rows(mixing.key, torch.float64, sc)  # float64 data: nothing to promote


class _NoRowsBackend(_CountingBackend):
    """Fails every graph with a 2-D input (the ``*_rows`` kernels), as inductor's CPU
    outer-loop fusion did on the cautious mask."""

    def __call__(self, gm, example_inputs):
        if any(isinstance(t, torch.Tensor) and t.dim() == 2 for t in example_inputs):
            raise RuntimeError("no rows here")
        return super().__call__(gm, example_inputs)


def test_rows_kernel_that_fails_to_compile_runs_tensor_by_tensor(kernel_mode, monkeypatch, caplog):
    """A rows kernel that does not compile: its tensors run one by one (compiled), the rule
    stays compiled for every other tensor, nothing is logged as a failed compile."""
    _fresh_runner(monkeypatch, _NoRowsBackend())
    eager, _ = _lars_steps(lars_rule, "eager", False)
    compiled, _ = _lars_steps(lars_rule, "compile", False)
    assert not K._failed and not [r for r in caplog.records if "compiling" in r.getMessage()]
    assert list(P._rows.values()) == [False]
    assert any(k[1] == "fused" and k[2] for k in K._kernels)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cached_flat_aliases_follow_replaced_tensors(kernel_mode, monkeypatch):
    """The runner keeps flat aliases of parameters and states across steps: a state replaced
    by a new tensor, a parameter given new memory (``p.data = ...``), are updated (not their
    old memory), and the cache lets go of an optimizer's tensors with the optimizer."""
    import gc

    import distopt.optim as do

    backend = _CountingBackend()
    monkeypatch.setattr(K, "BACKEND", backend)
    monkeypatch.setattr(K, "_kernels", {})
    gc.collect()
    cached = len(P._aliases)
    out = {}
    for mode in ("eager", "compile"):
        kernel_mode(mode)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 130), (5, 3), (15,)]]
        opt = do.Adan(params, lr=1e-2, weight_decay=0.05)
        for step in range(4):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            before = [t.clone() for p in params for t in (p, opt.state[p].get("exp_avg", p))]
            opt.step()
            after = [t for p in params for t in (p, opt.state[p]["exp_avg"])]
            assert all((a != b).any() for a, b in zip(after, before)), f"{mode}: not updated"
            if step == 1:
                for p in params:
                    st = opt.state[p]
                    st["exp_avg"] = st["exp_avg"].clone()  # a new state tensor
                    p.data = p.data.clone()  # new memory for the parameter
        out[mode] = [p.detach().clone() for p in params] + [
            opt.state[p]["exp_avg"].clone() for p in params
        ]
    for a, b in zip(out["eager"], out["compile"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(st[0]() is params[0] for st in P._aliases.values())
    del opt, params, p, st, before, after
    gc.collect()
    assert len(P._aliases) == cached, "flat aliases outlived their tensors"


def test_kept_concatenations_follow_replaced_tensors(kernel_mode, monkeypatch):
    """Small tensors are concatenated into buffers kept across steps and written back through
    flat views made once: a state replaced by a new tensor, a state given new memory in place
    (``set_``), a parameter given new memory (``p.data = ...``) are updated (eager's numbers),
    one graph serves every step, and the buffers go with the parameters or the states (an
    optimizer dropped while its parameters live leaves none of its state behind)."""
    import gc
    import weakref

    import distopt.optim as do

    backend = _fresh_runner(monkeypatch, _CountingBackend())
    gc.collect()
    kept = len(P._concats)
    shapes = [(5, 3), (15,), (4,), (2, 2, 3)]
    out = {}
    for mode in ("eager", "compile"):
        kernel_mode(mode)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = do.Adan(params, lr=1e-2, weight_decay=0.05)
        for step in range(5):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            before = [t.detach().clone() for p in params for t in (p, *opt.state[p].values())]
            opt.step()
            after = [t for p in params for t in (p, *opt.state[p].values())]
            if step > 0:  # every parameter and parameter-sized state changed
                changed = [(a != b).any() for a, b in zip(after, before) if a.dim() > 0]
                assert all(changed), f"{mode} step {step}: a tensor was not updated"
            if step == 1:
                opt.state[params[0]]["exp_avg"] = opt.state[params[0]]["exp_avg"].clone()
                params[1].data = params[1].data.clone()
            if step == 2:
                sq = opt.state[params[2]]["exp_avg_sq"]
                sq.set_(sq.clone())  # same tensor object, new memory
        out[mode] = [t.detach().clone() for p in params for t in (p, *opt.state[p].values())]
    assert backend.graphs == 1, "the kept buffers changed the kernel's signature"
    for a, b in zip(out["eager"], out["compile"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(P._concats) == kept + 1
    del opt, params, p, before, after, sq
    gc.collect()
    assert len(P._concats) == kept, "kept concatenations outlived their parameters"
    # an optimizer dropped while its parameters live: its states are not kept by the caches
    params = [torch.nn.Parameter(torch.randn(s)) for s in [*shapes, (300, 130)]]
    opt = do.Adan(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    states = [weakref.ref(t) for p in params for t in opt.state[p].values()]
    del opt
    gc.collect()
    assert not [r for r in states if r() is not None], "the caches kept a dropped optimizer's state"
    assert len(P._concats) == kept


# --------------------------------------------------------------------------- direct calls


def _axpy(p, g, sts, sc, stats, inv, fi):
    """A kernel-shaped function: in-place update of ``p`` and one state, returns a sum."""
    a, b = sc.unbind(0)
    new = p * a + g * b
    sts[0].copy_(sts[0] + g)
    p.copy_(new)
    return (new * new).sum(dtype=torch.float64) if stats is None else None


def test_compiled_calls_skip_dynamo_after_the_first_call_per_signature(monkeypatch):
    """:class:`K.Compiled`: the first call with each signature (shapes, dtypes, None-ness)
    goes through dynamo; later ones call the noted graph with the caller's tensors and give
    the same numbers and outputs as eager; a call whose inputs share memory keeps dynamo."""
    backend = _CountingBackend()
    c = K.Compiled(_axpy, backend, None)
    entries = []
    real = c._dynamo

    def counted(*args):
        entries.append(args)
        return real(*args)

    monkeypatch.setattr(c, "_dynamo", counted)
    sc = torch.tensor([0.5, 2.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for n, dtype, stats, calls in [(100, torch.float32, None, 3), (37, torch.float32, None, 2),
                                   (100, torch.float64, None, 2), (100, torch.float32, sc.clone(), 2)]:  # fmt: skip
        before = len(entries)
        for _ in range(calls):
            p, g, m = (torch.randn(n, generator=gen, dtype=dtype) for _ in range(3))
            want_p, want_m = p * 0.5 + g * 2.0, m + g
            want_out = _axpy(p.clone(), g, (m.clone(),), sc, stats, None, None)
            version = p._version
            out = c(p, g, (m,), sc, stats, None, None)
            torch.testing.assert_close(p, want_p)
            torch.testing.assert_close(m, want_m)
            assert p._version > version
            if stats is None:
                assert out is not None and out.dtype == torch.float64
                torch.testing.assert_close(out, want_out)
            else:
                assert out is None
        assert len(entries) == before + 1, f"n={n} {dtype}: dynamo entered again"
    assert backend.graphs == 3  # 100 and 37 share the dynamic-shape graph; float64; stats
    # inputs that share memory: dynamo's aliasing guard decides, every time
    buf = torch.randn(300, generator=gen)
    p, g, m = buf[:100], buf[100:200], buf[200:]
    before = len(entries)
    for _ in range(2):
        c(p, g, (m,), sc, None, None, None)
    assert len(entries) == before + 2


def test_private_tensors_keep_the_signature_and_its_guards(monkeypatch):
    """``_kernel_compile.private``: a tensor noted as its caller's own enters the signature as
    a token read from a table; calls with it skip dynamo exactly when calls with an ordinary
    tensor of the same metadata do (one dynamo entry per signature, same numbers), another
    shape or dtype still enters dynamo, a call whose gradient shares a private tensor's memory
    keeps dynamo's guards, and the table forgets a tensor when it goes."""
    import gc

    from distopt.optim import _kernel_compile as KC

    backend = _CountingBackend()
    c = K.Compiled(K._named(_axpy, "axpy_private"), backend, None)
    entries = []
    real = c._dynamo
    monkeypatch.setattr(c, "_dynamo", lambda *a: entries.append(1) or real(*a))
    sc = torch.tensor([0.5, 2.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)

    def check(n, dtype, private):
        p, g, m = (torch.randn(n, generator=gen, dtype=dtype) for _ in range(3))
        if private:
            KC.private(p, m)
        want_p, want_m = p * 0.5 + g * 2.0, m + g
        out = c(p, g, (m,), sc, None, None, None)
        torch.testing.assert_close((p, m), (want_p, want_m))
        torch.testing.assert_close(out, (want_p * want_p).sum(dtype=torch.float64))
        return p

    for private, n, dtype, dynamo in [(True, 64, torch.float32, 1), (True, 64, torch.float32, 0),
                                      (True, 64, torch.float32, 0), (True, 33, torch.float32, 1),
                                      (True, 64, torch.float64, 1), (False, 64, torch.float32, 1),
                                      (False, 64, torch.float32, 0)]:  # fmt: skip
        before = len(entries)
        check(n, dtype, private)
        assert len(entries) == before + dynamo, (private, n, dtype)
    # a gradient sharing the private parameter's memory: dynamo decides, every time
    buf = torch.randn(128, generator=gen)
    p, m = buf[:64].detach(), torch.randn(64, generator=gen)
    KC.private(p, m)
    before = len(entries)
    for _ in range(2):
        c(p, buf[64:], (m,), sc, None, None, None)
    assert len(entries) == before + 2
    # the table holds no tensor alive and drops its entries with them
    noted = len(KC._private)
    q = torch.randn(8)
    KC.private(q)
    assert len(KC._private) == noted + 1 and KC._on_cpu(q)
    del q
    gc.collect()
    assert len(KC._private) == noted


# --------------------------------------------------------------------------- caller-given stats


def _lars_given_steps(compile_mode, steps=3):
    """:func:`_lars_steps` (unsharded) with ``w_sq`` / ``g_sq`` given by the caller: no sums
    pass, no reduction."""
    K.set_mode(compile_mode)
    torch.manual_seed(0)
    params = [torch.randn(s) for s in _GROUP_SHAPES]
    states = [{"momentum_buffer": torch.zeros(s)} for s in _GROUP_SHAPES]
    opts = dict(adapt=True, trust_clip=False, momentum=True, nesterov=False)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        views = [
            ParamView(p, p, torch.randn(p.shape, generator=gen), p.shape, False, st)
            for p, st in zip(params, states)
        ]
        stats = [
            torch.stack([(v.data * v.data).sum(dtype=torch.float64),
                         (v.grad * v.grad).sum(dtype=torch.float64)])
            for v in views
        ]  # fmt: skip
        scalars = [dict(_LARS, first=float(step == 0)) for _ in views]
        K.apply(None, lars_rule, views, ("momentum_buffer",), scalars, sums=("w_sq", "g_sq"),
                stats=stats, **opts)  # fmt: skip
    return params + [st["momentum_buffer"] for st in states]


def test_caller_given_stats_equal_the_sums_pass(kernel_mode, monkeypatch):
    """``apply(..., sums=names, stats=[per view])``: the update with the caller's statistics
    equals the one after the runner's own sums pass (eager and compiled: update kernels only,
    small equal-sized tensors still as rows); malformed ``stats`` are refused."""
    _fresh_runner(monkeypatch, _CountingBackend())
    want, _ = _lars_steps(lars_rule, "eager", False)
    for mode in ("eager", "compile"):
        got = _lars_given_steps(mode)
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert sorted({k[1] for k in K._kernels if k[2]}) == ["update", "update_rows"]
    p = torch.randn(4)
    views = [ParamView(p, p, torch.randn(4), p.shape, False, {"momentum_buffer": torch.zeros(4)})]
    args = (None, lars_rule, views, ("momentum_buffer",), dict(_LARS, first=1.0))
    opts = dict(adapt=True, trust_clip=False, momentum=True, nesterov=False)
    good = [torch.ones(2, dtype=torch.float64)]
    with pytest.raises(ValueError, match="sums="):
        K.apply(*args, stats=good, **opts)
    with pytest.raises(ValueError, match="2 stats tensors for 1 views"):
        K.apply(*args, sums=("w_sq", "g_sq"), stats=good * 2, **opts)
    with pytest.raises(ValueError, match=r"stats\[0\] must be a float64 tensor of shape \(2,\)"):
        K.apply(*args, sums=("w_sq", "g_sq"), stats=[torch.ones(2)], **opts)
    with pytest.raises(ValueError, match=r"stats\[0\] must be a float64 tensor of shape \(2,\)"):
        K.apply(*args, sums=("w_sq", "g_sq"), stats=[torch.ones(3, dtype=torch.float64)], **opts)


def test_compiled_without_the_private_inductor_entry_goes_through_dynamo(monkeypatch):
    """Where this torch has no inductor entry for a backend of one's own
    (``_torch_private.inductor_compiler`` gives ``None``), or the backend is another name,
    :class:`K.Compiled` is plain ``torch.compile``: every call through dynamo, same numbers."""
    from distopt import _torch_private

    monkeypatch.setattr(_torch_private, "inductor_compiler", lambda options: None)
    assert not K.Compiled(_axpy, "inductor", K.COMPILE_OPTIONS).direct
    c = K.Compiled(_axpy, "aot_eager", None)
    assert not c.direct
    sc = torch.tensor([0.5, 2.0], dtype=torch.float64)
    for _ in range(2):
        p, g, m = torch.randn(50), torch.randn(50), torch.randn(50)
        want_p, want_m = p * 0.5 + g * 2.0, m + g
        out = c(p, g, (m,), sc, None, None, None)
        torch.testing.assert_close(p, want_p)
        torch.testing.assert_close(m, want_m)
        torch.testing.assert_close(out, (want_p * want_p).sum(dtype=torch.float64))
    assert not c._direct


def _scalar_heavy(p, g, sts, sc, stats, inv, fi):
    """Scalar maths of the pack (float32 and float64 uses) and of an in-kernel sum."""
    b1, b2, lr = sc.unbind(0)
    m = torch.lerp(sts[0], g, 1.0 - b1)  # float32 use of a float64 scalar
    big = (g.double() * (1.0 - b2).sqrt()).sum()  # float64 use: stays float64
    r = (p * p).sum().sqrt() / ((1.0 - b2) * 3.0 + 1.0)  # a value of the kernel's own sum
    p.copy_(p - (lr / (1.0 - b1)) * m * r + big.float() * 1e-9)
    sts[0].copy_(m)


def test_scalar_maths_is_hoisted_out_of_the_element_loop(monkeypatch):
    """:func:`K._hoist_scalars`: every 0-dim value computed from the scalar pack (or from the
    kernel's own sums) that meets the elements becomes one stacked max over 16 copies (a value
    inductor stores once per call); the kernel gives eager's numbers bit for bit."""
    seen = []

    def backend(gm, example_inputs):
        seen.append([n for n in gm.graph.nodes if n.op == "call_method" and n.target == "amax"])
        return gm.forward

    monkeypatch.setattr(K, "HOIST", True)
    c = K.Compiled(_scalar_heavy, backend, None)
    sc = torch.tensor([0.9, 0.999, 1e-3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    p, g, m = (torch.randn(1000, generator=gen) for _ in range(3))
    want = [p.clone(), m.clone()]
    _scalar_heavy(want[0], g, (want[1],), sc, None, None, None)
    for _ in range(2):  # the dynamo call, then the direct one
        got = [p.clone(), m.clone()]
        c(got[0], g, (got[1],), sc, None, None, None)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    (amax,) = seen  # one graph
    # one stacked max for the pack's two float32-used values (1 - b1, lr / (1 - b1)), one for
    # its float64-used value, one each for the two values of the kernel's own sums
    assert len(amax) == 4, [str(n) for n in amax]
    assert sorted(n.args[0].args[0].args[0].args[0].__len__() for n in amax) == [1, 1, 1, 2]


def _two_outputs(p, g, sts, sc, stats, inv, fi):
    p.copy_(p + g)
    return (p * 2.0).sum(dtype=torch.float64), None, g * 3.0


def test_compiled_direct_calls_return_tuples_and_rules_may_keep_their_scalar_maths(monkeypatch):
    """A kernel returning a tuple of graph outputs and Nones is called directly too (dynamo
    entered once per signature); ``hoist=False`` (``rule.hoist_scalars = False`` for
    :func:`K.apply`) leaves the scalar maths in place."""
    backend = _CountingBackend()
    c = K.Compiled(_two_outputs, backend, None)
    entries = []
    real = c._dynamo
    monkeypatch.setattr(c, "_dynamo", lambda *a: entries.append(1) or real(*a))
    sc = torch.tensor([1.0], dtype=torch.float64)
    for _ in range(3):
        p, g = torch.randn(40), torch.randn(40)
        want = (p + g, ((p + g) * 2.0).sum(dtype=torch.float64), g * 3.0)
        a, none, b = c(p, g, (), sc, None, None, None)
        assert none is None
        torch.testing.assert_close(p, want[0])
        torch.testing.assert_close(a, want[1])
        torch.testing.assert_close(b, want[2])
    assert len(entries) == 1

    seen = []

    def counting(gm, example_inputs):
        seen.append(sum(1 for n in gm.graph.nodes if n.target == "amax"))
        return gm.forward

    sc3 = torch.tensor([0.9, 0.999, 1e-3], dtype=torch.float64)
    for hoist in (False, True):
        k = K.Compiled(K._named(_scalar_heavy, f"scalar_heavy_{hoist}"), counting, None, hoist)
        k(torch.randn(30), torch.randn(30), (torch.randn(30),), sc3, None, None, None)
    assert seen == [0, 4]


def test_compiled_kernel_merges_per_kernel_options(monkeypatch):
    """``compiled_kernel(fn, options=...)``: the kernel's inductor options are the runner's
    with the given ones merged over them (for that kernel only); not used with another
    backend; anything but a mapping is refused with a clear error."""
    got = []
    monkeypatch.setattr(K, "Compiled", lambda fn, backend, options, hoist: got.append(options))
    monkeypatch.setattr(K, "BACKEND", "inductor")
    K.compiled_kernel(_axpy)
    K.compiled_kernel(_axpy, options={"score_fusion_memory_threshold": 0, "cpp.vec_isa_ok": False})
    base = {**K.COMPILE_OPTIONS, **K._precision_option()}
    assert got[0] == base
    assert got[1] == {**base, "score_fusion_memory_threshold": 0, "cpp.vec_isa_ok": False}
    assert K.COMPILE_OPTIONS["cpp.vec_isa_ok"] is True  # the runner's own options untouched
    monkeypatch.setattr(K, "BACKEND", _CountingBackend())
    K.compiled_kernel(_axpy, options={"score_fusion_memory_threshold": 0})
    assert got[2] is None
    with pytest.raises(TypeError, match="options must be a mapping"):
        K.compiled_kernel(_axpy, options=[("score_fusion_memory_threshold", 0)])


def _generated_source(call) -> str | None:
    """The generated Python/C++ source behind a direct call: inductor's module file for its
    generated ``call`` (``_kernel.GENERATED``), through a version-marking wrapper, or the
    compiled graph's ``source_code`` behind a call through the wrappers."""
    cells = {}
    if hasattr(call, "__code__"):  # a Python function of the runner's (not a bound method)
        cells = dict(zip(call.__code__.co_freevars, (c.cell_contents for c in call.__closure__ or ())))
    if "graph" in cells:  # through the wrappers
        return getattr(cells["graph"], "source_code", None)
    if "call" in cells:  # the generated call behind the version marking
        call = cells["call"]
    path = inspect.getsourcefile(call)
    return open(path).read() if path else None


def _omp_regions(c: K.Compiled, directs: dict) -> list[str]:
    """The OpenMP pragma lines of the C++ source of the one graph in ``directs``."""
    ((call, _, _),) = directs.values()
    src = _generated_source(call)
    if not isinstance(src, str):
        pytest.skip("this torch's compiled graphs carry no source_code")
    return [ln.strip() for ln in src.splitlines() if "#pragma omp parallel" in ln]


@pytest.mark.skipif(
    not K._can_compile(torch.device("cpu")), reason="no C++ compiler for torch.compile"
)
def test_cpu_kernels_have_a_serial_build_and_one_without_extra_regions(monkeypatch):
    """``THREADS_KEYED``: a runner kernel called at 1 thread runs a serial build (no OpenMP
    region in its C++), at 2 threads a build whose regions read the thread count when they
    run, without the hoisted scalars' regions (one region per loop over the elements); both
    on code objects of their own, both the same numbers as eager.  With the switch off: the
    one build with hoisting, regions more."""
    options = {**K.COMPILE_OPTIONS, **K._precision_option()}
    c = K.Compiled(K._named(_scalar_heavy, "scalar_heavy_threads"), "inductor", options)
    torch.manual_seed(0)
    p, g, m = torch.randn(5000), torch.randn(5000), torch.randn(5000)
    sc = torch.tensor([0.9, 0.99, 1e-3], dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            want_p, want_m = p.clone(), m.clone()
            _scalar_heavy(want_p, g, (want_m,), sc, None, None, None)
            c(p, g, (m,), sc, None, None, None)
            torch.testing.assert_close((p, m), (want_p, want_m))
        assert sorted(c._per_threads) == [False, True] and not c._direct
        assert _omp_regions(c, c._per_threads[True][1]) == []
        two = _omp_regions(c, c._per_threads[False][1])
        monkeypatch.setattr(K, "THREADS_KEYED", False)
        c(p, g, (m,), sc, None, None, None)
        assert sorted(c._per_threads) == [False, True]
        hoisted = _omp_regions(c, c._direct)
        # the sums of p*p and of g (2 loops) and the update, each one region; hoisted: one more
        # per batch of hoisted values (4 here)
        assert len(two) == 3 and len(hoisted) > 3, (two, hoisted)
        assert not any("num_threads" in ln for ln in two + hoisted)
    finally:
        torch.set_num_threads(before)


def test_hoisted_kernels_load_from_aot_autograds_cache(monkeypatch):
    """The hoisting pass gives each node it adds an example value, as dynamo gives the nodes it
    traces, so AOT autograd's cache takes the hoisted graph: a second start of the same kernel
    (a warm process start) loads the graph from the cache instead of tracing it through AOT
    autograd again (without the example values it was bypassed: ~1.5 s of each warm start
    of a large rule) and gives the same numbers."""
    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config

    from distopt import _torch_private

    if _torch_private.inductor_compiler({}) is None or not K._can_compile(torch.device("cpu")):
        pytest.skip("no inductor entry or no C++ compiler")
    options = {**K.COMPILE_OPTIONS, **K._precision_option()}
    monkeypatch.setattr(K, "HOIST", True)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", True)
    seen = []
    sc = torch.tensor([0.9, 0.999, 1e-3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    p, g, m = (torch.randn(1000, generator=gen) for _ in range(3))
    want = [p.clone(), m.clone()]
    _scalar_heavy(want[0], g, (want[1],), sc, None, None, None)
    counters.clear()
    outs = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the serial build: the one with hoisted scalars
    try:
        for _ in range(2):  # two starts of the same kernel
            c = K.Compiled(K._named(_scalar_heavy, "scalar_heavy_cached"), "inductor", options)
            got = [p.clone(), m.clone()]
            c(got[0], g, (got[1],), sc, None, None, None)
            torch.testing.assert_close(got, want)
            outs.append(got)
            seen.append(dict(counters["aot_autograd"]))
    finally:
        torch.set_num_threads(before)
    assert all(s.get("autograd_cache_bypass", 0) == 0 for s in seen), seen
    assert seen[1].get("autograd_cache_hit", 0) == seen[0].get("autograd_cache_hit", 0) + 1, seen
    assert all(torch.equal(a, b) for a, b in zip(*outs))  # the loaded graph: the same numbers
