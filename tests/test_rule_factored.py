"""Adafactor's and AdafactorBigVision's per-tensor phases (distopt/optim/_rule_factored.py).

The optimizers' numbers are checked against their references in the case table
(tests/test_optim.py, tests/test_shard_maths.py, ...); here: the 5-D layout, non-contiguous
tensors (a contiguous copy written back), and, with ``DISTOPT_TEST_COMPILED=all`` (minutes of
cold compiles), the compiled phases against the eager ones.
"""

from __future__ import annotations

import os

import pytest
import torch

import distopt.optim as do
from distopt.optim import _kernel as K
from distopt.optim import _rule_factored as R
from distopt.optim import _state_stacks
from tests.problems import make_params, run_quadratic
from tests.references_shape import RefAdafactor


@pytest.mark.parametrize(
    "shape,dims,want",
    [
        ((6, 5), (0, 1), ((1, 6, 1, 5, 1), 1, 3, True, False)),  # transformers: columns over dim 0
        ((6, 5), (1, 0), ((1, 6, 1, 5, 1), 3, 1, False, True)),  # Big Vision: dim 0 the largest
        ((4, 3, 5, 2), (0, 1), ((1, 4, 1, 3, 10), 1, 3, True, False)),  # timm: conv kernel
        ((4, 3, 5, 2), (3, 2), ((12, 5, 1, 2, 1), 3, 1, True, True)),
        ((2, 7, 3, 5), (1, 3), ((2, 7, 3, 5, 1), 1, 3, True, True)),
    ],
)
def test_layout(shape, dims, want):
    lay = R.layout(torch.Size(shape), dims)
    assert (lay.shape5, lay.dc, lay.dr, lay.row_local, lay.col_local) == want
    assert R.layout(torch.Size(shape), None) is None


def test_layout_of_an_unsharded_tensor_has_every_statistic_local():
    for dims in ((0, 1), (1, 0)):
        lay = R.layout(torch.Size((6, 5)), dims, sharded=False)
        assert (lay.row_local, lay.col_local) == (True, True)


def test_pack_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown scalar names"):
        R.pack(w2=0.1, beta=0.9)


@pytest.mark.parametrize("rows", [16, 17, 31, 32, 45])
def test_blocked_sum_over_dim_1_is_the_sum(rows):
    """The blocked sum over dim 1 (compiled calls on >= 16 rows) is the plain sum: every row
    counted once (whole blocks and the rows past them, whatever ``rows % 16``), non-finite
    values kept as they are (inf stays inf, NaN stays NaN)."""
    from distopt.optim._factored import _sum

    x = torch.randn(2, rows, 3, 5, 1, dtype=torch.float64)
    torch.testing.assert_close(_sum(x, 1, True), x.sum(1, keepdim=True), rtol=1e-12, atol=0)
    assert torch.equal(_sum(x, 3, True), x.sum(3, keepdim=True))
    x[0, rows - 1, 0, 0, 0] = float("inf")  # a row past the last whole block (or in it)
    x[1, 0, 2, 4, 0] = float("nan")
    got, want = _sum(x, 1, True), x.sum(1, keepdim=True)
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got.isnan(), want.isnan())


def test_blocked_sum_traces_once_for_every_row_count():
    """One graph for 16..48 rows: the rows past the last whole block are taken as the last 16
    rows with a mask, so nothing is specialised on ``rows % 16`` (a slice of that length was
    specialised on being empty: a second compile of every Adafactor kernel)."""
    from distopt.optim._factored import _sum

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda x: _sum(x * x, 1, True), backend=backend, dynamic=True, fullgraph=True)
    for rows in (16, 20, 32, 37, 48):
        x = torch.randn(1, rows, 1, 24, 1)
        torch.testing.assert_close(f(x), (x * x).sum(1, keepdim=True))
    assert len(graphs) == 1


def test_blocked_sums_except_big_vision_views_that_are_no_matrix():
    """Compiled calls on >= 16 rows sum over dim 1 in blocks, except Big Vision's on a 5-D view
    that is no plain matrix (its graph of its own, the costliest to compile with blocks);
    transformers/timm Adafactor keep blocks there; fewer rows or eager calls: no blocks."""
    from distopt.optim._factored import Options

    flags = dict(psq=False, scale=False, clip=False, momentum=True, caution=False, decay=True)
    hf, bv = Options("hf", **flags), Options("bv", **flags)

    def lay(shape, dims):
        return R.layout(torch.Size(shape), dims)

    for shape, dims in (((1152, 384), (1, 0)), ((384, 1536), (0, 1)), ((1, 197, 384), (1, 2))):
        assert R._blocks(True, lay(shape, dims), bv)
        assert not R._blocks(False, lay(shape, dims), bv)
    pe = (384, 3, 16, 16)  # ViT-S's patch embedding: Big Vision's view (1, 384, 48, 16, 1)
    assert not R._blocks(True, lay(pe, (3, 0)), bv)
    assert R._blocks(True, lay(pe, (3, 0)), hf)
    assert R._blocks(True, lay(pe, (2, 3)), hf)  # transformers: (1152, 16, 1, 16, 1)
    assert not R._blocks(True, lay((15, 384), (0, 1)), bv)  # below BLOCK rows
    assert not R._blocks(True, lay((15, 384), (0, 1)), hf)


def test_parameter_rms_statistics_are_compiled_with_the_fusion_option(monkeypatch):
    """transformers/timm Adafactor's statistics kernels (the sums of p^2 beside those of g^2)
    are compiled with inductor's score_fusion_memory_threshold lowered, so the two loops fuse;
    Big Vision's and the other phases keep the runner's options."""
    from distopt.optim._factored import Options

    seen = []

    class Recorder:
        def __init__(self, fn, backend, options, hoist):
            seen.append(dict(options or {}))

    monkeypatch.setattr(K, "Compiled", Recorder)
    monkeypatch.setattr(K, "BACKEND", "inductor")
    monkeypatch.setattr(R, "_kernels", {})
    flags = dict(scale=True, clip=True, momentum=False, caution=False, decay=True)
    hf, bv = Options("hf", True, **flags), Options("bv", False, **flags)
    for fn, opt, fused in (
        (R.step_factored, hf, True),
        (R.stats_factored, hf, True),
        (R.apply_factored, hf, False),
        (R.step_factored, bv, False),
    ):
        R._kernel(fn, True, (("dc", 1), ("dr", 3), ("opt", opt)))
        got = seen[-1].get("score_fusion_memory_threshold")
        assert got == (0 if fused else None), (fn.__name__, opt.flavour, got)
        assert seen[-1]["cpp.dynamic_threads"] is True  # the runner's own options kept


_MAKERS = {
    "adafactor": lambda p: do.Adafactor(
        p, lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.01
    ),
    "adafactor-timm-caution": lambda p: do.AdafactorTimm(
        p, lr=1e-2, betas=(0.9, 0.999), min_dim_size_to_factor=2, caution=True
    ),
    "adafactorbv-clip": lambda p: do.AdafactorBigVision(
        p, lr=1e-2, min_dim_size_to_factor=2, clipping_threshold=1.0, momentum_dtype=torch.float32
    ),
}


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_non_contiguous_parameter_equals_its_contiguous_copy(name):
    """A transposed parameter (non-contiguous data and gradient) is updated through a contiguous
    copy written back: the same numbers (up to the order of summation) as the same values stored
    contiguously."""
    torch.manual_seed(0)
    base = torch.randn(9, 6)
    a = torch.nn.Parameter(base.t().contiguous())  # (6, 9), contiguous
    b = torch.nn.Parameter(base.clone().t())  # (6, 9), a transposed view
    assert not b.is_contiguous()
    opt_a, opt_b = _MAKERS[name]([a]), _MAKERS[name]([b])
    for t in range(4):
        g = torch.randn(9, 6, generator=torch.Generator().manual_seed(t))
        a.grad = g.t().contiguous()
        b.grad = g.t()  # non-contiguous too
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    assert not b.is_contiguous()
    for k, v in opt_a.state[a].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(opt_b.state[b][k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(
    os.environ.get("DISTOPT_TEST_COMPILED") != "all" or not K._can_compile(torch.device("cpu")),
    reason="compiled phases: set DISTOPT_TEST_COMPILED=all (minutes of cold compiles)",
)
@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_compiled_equals_eager(name, monkeypatch):
    monkeypatch.setattr(R, "EAGER_BELOW", 0)  # the test's tensors are small: compile them all
    out = {}
    try:
        for mode in ("eager", "compile"):
            K.set_mode(mode)
            params = make_params()
            opt = _MAKERS[name](params)
            run_quadratic(opt, params, 6, False)
            out[mode] = (params, opt)
    finally:
        K.set_mode(None)
    # compiled for real: no phase fell back to eager (that would compare eager with eager)
    assert not R._failed, f"{name}: compiling fell back to eager for {R._failed}"
    assert any(compiled for (_, _, compiled) in R._kernels), f"{name}: nothing was compiled"
    for i, (a, b) in enumerate(zip(out["eager"][0], out["compile"][0])):
        torch.testing.assert_close(
            b.detach(),
            a.detach(),
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, i=i: f"{name}: parameter {i}: {m}",
        )


@pytest.mark.parametrize("name", ["adafactor", "adafactorbv-clip"])
def test_stacked_vectors_equal_one_optimizer_per_tensor(name, monkeypatch):
    """Unfactored tensors of one shape run as one stacked call per phase: the same numbers
    as each tensor in an optimizer of its own (nothing stacked), with the per-tensor RMS and clip
    kept apart; a tensor that skips a step (a different step count) is not stacked with the rest."""
    torch.manual_seed(0)
    shapes = [(7,), (7,), (7,), (3, 7), (5,)]
    base = [torch.randn(s) for s in shapes]
    together = [torch.nn.Parameter(b.clone()) for b in base]
    apart = [torch.nn.Parameter(b.clone()) for b in base]
    opt = _MAKERS[name](together)
    opts = [_MAKERS[name]([p]) for p in apart]
    calls = []
    stats_plain = R.stats_plain
    monkeypatch.setattr(
        R, "stats_plain", lambda p, *a, **k: calls.append(p.shape) or stats_plain(p, *a, **k)
    )
    for t in range(4):
        gen = torch.Generator().manual_seed(t)
        grads = [torch.randn(s, generator=gen) * (i + 1) for i, s in enumerate(shapes)]
        for i, (a, b) in enumerate(zip(together, apart)):
            skip = t == 1 and i == 0  # parameter 0 gets no gradient at step 1
            a.grad = None if skip else grads[i].clone()
            b.grad = None if skip else grads[i].clone()
        opt.step()
        for o in opts:
            o.step()
    for a, b in zip(together, apart):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert torch.Size([3, 7]) in calls, "the three (7,) vectors were not stacked"
    assert torch.Size([2, 7]) in calls, "vectors at a different step were stacked together"


@pytest.mark.parametrize("name", ["adafactor", "adafactorbv"])
def test_stacked_states_are_kept_views_of_one_stack(name):
    """The states of a unit of equal unfactored tensors become views of one stack per state,
    kept across steps (nothing stacked or copied back for them): a write into a state in place
    is seen, a ``load_state_dict`` resumes bit for bit against an uninterrupted run, a skipped
    step (another unit) still gives the per-tensor numbers, and a dropped optimizer leaves none
    of its state alive in the cache."""
    import copy
    import gc
    import weakref

    makers = {
        "adafactor": _MAKERS["adafactor"],
        "adafactorbv": lambda p: do.AdafactorBigVision(p, lr=1e-2, weight_decay=0.01),
    }
    make = makers[name]
    torch.manual_seed(0)
    shapes = [(7,), (7,), (7,), (3, 7)]
    base = [torch.randn(s) for s in shapes]
    runs = {k: [torch.nn.Parameter(b.clone()) for b in base] for k in ("kept", "apart", "resumed")}
    opt = make(runs["kept"])
    apart = [make([q]) for q in runs["apart"]]
    resumed = make(runs["resumed"])
    for t in range(8):
        gen = torch.Generator().manual_seed(t)
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for k, ps in runs.items():
            for i, (q, g) in enumerate(zip(ps, grads)):
                q.grad = None if (t == 3 and i == 0) else g.clone()
        opt.step()
        for o in apart:
            o.step()
        resumed.step()
        if t == 0:
            vecs = [opt.state[q]["exp_avg_sq"] for q in runs["kept"][:3]]
            ptrs = {v.untyped_storage().data_ptr() for v in vecs}
            assert len(ptrs) == 1, "the three vectors' states are not views of one stack"
            del vecs
        if t >= 6:  # kept: the same state tensors from step to step (no stacking again)
            now = [o.state[ps[1]]["exp_avg_sq"] for o, ps in ((opt, runs["kept"]),
                                                              (resumed, runs["resumed"]))]  # fmt: skip
            assert t == 6 or all(a is b for a, b in zip(now, kept_state)), (
                "the stack was made again without a change"
            )
            kept_state = now
        if t == 1:  # in place, into a state of each run
            for o, q in ((opt, runs["kept"][1]), (apart[1], runs["apart"][1]),
                         (resumed, runs["resumed"][1])):  # fmt: skip
                o.state[q]["exp_avg_sq"].mul_(2.0)
        if t == 4:  # fresh state tensors with the same values (the stack is made again)
            sd = copy.deepcopy(resumed.state_dict())
            resumed = make(runs["resumed"])
            resumed.load_state_dict(sd)
            del sd  # the states it gave go when the stack replaces them
    for a, b, c in zip(runs["kept"], runs["apart"], runs["resumed"]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(a, c), "the resumed run is not the uninterrupted one bit for bit"
    # after the skipped step, parameters 1 and 2 (one step count) are the stacked unit
    assert any(key[1] == (id(runs["kept"][1]), id(runs["kept"][2])) for key in _state_stacks._stacks)
    states = [weakref.ref(t) for q in runs["kept"] for t in opt.state[q].values()
              if isinstance(t, torch.Tensor)]  # fmt: skip
    del opt, q, kept_state, now
    gc.collect()
    assert not [r for r in states if r() is not None], "the cache kept a dropped optimizer's state"
    assert not any(id(runs["kept"][1]) in key[1] for key in _state_stacks._stacks)


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_parameter_written_between_steps_is_seen(mode, monkeypatch):
    """The parameter RMS (``scale_parameter``) of an unsharded factored tensor follows writes to
    the parameter between steps (in place; a new ``.data``): the numbers of the reference
    (transformers' maths), which reads the parameter every step."""
    if mode == "compile" and not K._can_compile(torch.device("cpu")):
        pytest.skip("no compiler")
    monkeypatch.setattr(R, "EAGER_BELOW", 0)
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    p, q = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    try:
        K.set_mode(mode)
        opt = do.Adafactor([p], weight_decay=0.01)
        ref = RefAdafactor([q], weight_decay=0.01)
        for t in range(5):
            g = torch.randn(6, 5, generator=torch.Generator().manual_seed(t))
            p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
            with torch.no_grad():
                if t == 1:  # in place
                    p.mul_(3.0)
                    q.mul_(3.0)
                if t == 2:  # new storage
                    p.data = p.data * 0.25
                    q.data = q.data * 0.25
    finally:
        K.set_mode(None)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)


def test_compiled_bf16_momentum_is_written_in_place_without_a_buffer(monkeypatch):
    """Big Vision's compiled step stores its bfloat16 first moment in the loop that computes it
    and its parameter loop reads the stored moment: inductor's C++ allocates no tensor-sized
    bfloat16 buffer per call (with copy_ stores the new moment went through one, copied into the
    state by the parameter's loop: checked)."""
    import re

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    if not K._can_compile(torch.device("cpu")):
        pytest.skip("no compiler")
    monkeypatch.setattr(R, "EAGER_BELOW", 0)
    monkeypatch.setattr(R, "_kernels", {})
    monkeypatch.setattr(R, "_failed", set())
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # generate, not a cache hit
    p = torch.nn.Parameter(torch.randn(48, 40, generator=torch.Generator().manual_seed(0)))
    p.grad = torch.randn(48, 40, generator=torch.Generator().manual_seed(1)) * 1e-3
    opt = do.AdafactorBigVision([p], lr=1e-2, weight_decay=0.01)
    try:
        K.set_mode("compile")
        _, codes = run_and_get_code(opt.step)
    finally:
        K.set_mode(None)
    assert not R._failed, f"compiling fell back to eager for {R._failed}"
    assert len(codes) == 1, "one compiled step"
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert not re.findall(r"empty_strided_cpu\(\(1, s\d+, 1, s\d+, 1\)[^\n]*bfloat16", codes[0]), (
        codes[0]
    )


def test_compiled_bf16_momentum_rounds_the_update_as_eager(monkeypatch):
    """Big Vision's bfloat16 first moment: ``lerp(m, u.to(bfloat16), 1 - beta1)`` (timm's
    rounding, kept by the eager phases). Inductor drops a cast to bfloat16 that a fused kernel
    converts back unless ``emulate_precision_casts`` is on (the runner's compile option): the
    compiled moment then differs from eager by a unit in the last place in ~40% of elements;
    with it, only where float32 differences (the sums' order) flip a rounding (none here)."""
    if not K._can_compile(torch.device("cpu")):
        pytest.skip("no compiler")
    monkeypatch.setattr(R, "EAGER_BELOW", 0)
    base = torch.randn(48, 40, generator=torch.Generator().manual_seed(0)) * 0.02
    out = {}
    try:
        for mode in ("eager", "compile"):
            K.set_mode(mode)
            p = torch.nn.Parameter(base.clone())
            opt = do.AdafactorBigVision([p], lr=1e-2, weight_decay=0.01)
            for t in range(4):
                p.grad = torch.randn(48, 40, generator=torch.Generator().manual_seed(t)) * 1e-3
                opt.step()
            out[mode] = (p.detach(), opt.state[p]["exp_avg"])
    finally:
        K.set_mode(None)
    assert not R._failed, f"compiling fell back to eager for {R._failed}"
    (pe, me), (pc, mc) = out["eager"], out["compile"]
    assert me.dtype == mc.dtype == torch.bfloat16
    differ = (me != mc).sum().item()
    assert differ <= me.numel() // 100, f"{differ} of {me.numel()} bfloat16 moments differ"
    torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["adafactor", "adafactorbv-clip"])
def test_kept_5d_aliases_follow_replaced_tensors_and_free_dropped_state(name):
    """A factored tensor's 5-D aliases are kept across steps: a new ``.data`` for the parameter
    and a replaced state tensor (``load_state_dict``) are seen (the numbers of a fresh optimizer
    given the same values), and an optimizer dropped while its parameters live leaves none of
    its state alive in the cache."""
    import copy
    import gc
    import weakref

    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6, 5))
    q.data.copy_(p.data)
    opt_p, opt_q = _MAKERS[name]([p]), _MAKERS[name]([q])
    for t in range(5):
        g = torch.randn(6, 5, generator=torch.Generator().manual_seed(t))
        p.grad, q.grad = g.clone(), g.clone()
        opt_p.step()
        opt_q.step()
        with torch.no_grad():
            if t == 1:  # new storage for both parameters
                p.data = p.data * 0.5
                q.data = q.data * 0.5
        if t == 2:  # p's optimizer gets fresh state tensors with the same values
            sd = copy.deepcopy(opt_q.state_dict())  # loaded as is, torch shares "step"
            opt_p = _MAKERS[name]([p])
            opt_p.load_state_dict(sd)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    for k, v in opt_q.state[q].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(opt_p.state[p][k], v, rtol=1e-6, atol=1e-7)
    states = [weakref.ref(t) for t in opt_p.state[p].values() if isinstance(t, torch.Tensor)]
    assert any(key[0] == id(p) for key in R._fives), "no 5-D aliases were kept"
    del opt_p, sd  # the loaded states are the state dict's tensors
    gc.collect()
    assert not [r for r in states if r() is not None], "the cache kept a dropped optimizer's state"
    assert not any(key[0] == id(p) for key in R._fives)


@pytest.mark.parametrize("momentum_dtype", [torch.bfloat16, torch.float32])
def test_both_orientations_of_a_matrix_share_one_compiled_step(momentum_dtype, monkeypatch):
    """Big Vision without the clip: a tall matrix (column statistic over dim 3 of the 5-D view),
    a fat one and a (1, rows, cols) tensor (column statistic over dim 1: passed swapped, see
    ``_factored._factors``) take ONE compiled one-call graph (each orientation compiled its own
    before), and their parameters and every state are bitwise those of the eager run, which
    calls the unswapped form; with the clip each orientation keeps a graph of its own."""
    graphs = []

    def backend(gm, example_inputs):  # the captured graph as it is: no C++ build
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(K, "BACKEND", backend)
    monkeypatch.setattr(R, "_kernels", {})
    monkeypatch.setattr(R, "_failed", set())
    monkeypatch.setattr(R, "EAGER_BELOW", 100)  # the matrices compiled, the vector eager
    # fewer than BLOCK rows everywhere: the same (unblocked) sums compiled and eager
    shapes = [(13, 11), (11, 13), (1, 12, 13), (7,)]  # no size 15: the pack's length

    def run(mode, clip):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = do.AdafactorBigVision(
            params,
            lr=1e-2,
            min_dim_size_to_factor=2,
            weight_decay=0.01,
            momentum_dtype=momentum_dtype,
            clipping_threshold=clip,
        )
        K.set_mode(mode)
        try:
            for t in range(4):
                gen = torch.Generator().manual_seed(t)
                for i, p in enumerate(params):
                    p.grad = torch.randn(p.shape, generator=gen) * (i + 1)
                opt.step()
        finally:
            K.set_mode(None)
        return [t.detach().clone() for p in params for t in (p, *opt.state[p].values())]

    eager = run("eager", None)
    assert not graphs
    compiled = run("compile", None)
    assert not R._failed, f"compiling fell back to eager for {R._failed}"
    assert len(graphs) == 1, f"{len(graphs)} graphs for the three factored tensors"
    assert len(eager) == len(compiled)
    for i, (a, b) in enumerate(zip(eager, compiled)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"tensor {i} differs"
    graphs.clear()
    run("compile", 1.0)
    assert len(graphs) == 2  # the clip's sum of u^2 runs over dc: one graph per orientation


def test_compiled_swapped_orientation_equals_eager(monkeypatch):
    """With inductor: a tall and a fat matrix of one Big Vision optimizer (no clip) run one
    compiled step kernel (the fat one with its statistics swapped) and give eager's numbers (as
    ``test_compiled_bf16_momentum_rounds_the_update_as_eager``: float32 differences only)."""
    if not K._can_compile(torch.device("cpu")):
        pytest.skip("no compiler")
    monkeypatch.setattr(R, "EAGER_BELOW", 0)
    gen = torch.Generator().manual_seed(0)
    bases = [torch.randn(48, 40, generator=gen) * 0.02, torch.randn(40, 48, generator=gen) * 0.02]
    out = {}
    try:
        for mode in ("eager", "compile"):
            K.set_mode(mode)
            params = [torch.nn.Parameter(b.clone()) for b in bases]
            opt = do.AdafactorBigVision(params, lr=1e-2, weight_decay=0.01)
            for t in range(4):
                g = torch.Generator().manual_seed(t)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g) * 1e-3
                opt.step()
            out[mode] = [t for p in params for t in (p.detach(), *opt.state[p].values())]
    finally:
        K.set_mode(None)
    assert not R._failed, f"compiling fell back to eager for {R._failed}"
    from distopt.optim._factored import Options

    bv = Options("bv", False, False, False, True, False, True)  # this optimizer's options
    steps = [
        dict(key)
        for fn, key, compiled in R._kernels
        if fn is R.step_factored and compiled and dict(key)["opt"] == bv
    ]
    assert steps == [{"block": True, "dc": 3, "dr": 1, "either": True, "opt": bv}], steps
    for i, (a, b) in enumerate(zip(out["eager"], out["compile"])):
        if a.dtype == torch.bfloat16:  # the moment: a rounding may flip where float32 sums differ
            assert (a != b).sum().item() <= a.numel() // 100, f"tensor {i}"
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m, i=i: f"{i}: {m}")


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_big_vision_float32_pack_gives_the_float64_pack_numbers(mode, monkeypatch):
    """Big Vision's float32 tensors get a float32 scalar pack (every use casts its entries to
    float32): bitwise the numbers of a float64 pack (lr 0.011, eps 1e-30 and the decay are not
    float32 values, so any use computing in float64 would differ), with the clip, the cautious
    mask and the corrected decay; float64 tensors keep a float64 pack."""
    monkeypatch.setattr(K, "BACKEND", lambda gm, example_inputs: gm.forward)  # traced, no C++
    monkeypatch.setattr(R, "_kernels", {})
    monkeypatch.setattr(R, "_failed", set())
    monkeypatch.setattr(R, "EAGER_BELOW", 100)
    made = R.device_tensor
    dtypes = []

    def run(force64, dtype, **kw):
        def device_tensor(values, dt, dev):
            dtypes.append(dt)
            return made(values, torch.float64 if force64 else dt, dev)

        monkeypatch.setattr(R, "device_tensor", device_tensor)
        torch.manual_seed(0)
        shapes = [(13, 11), (11, 13), (7,), (7,)]
        params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
        opt = do.AdafactorBigVision(
            params, lr=0.011, min_dim_size_to_factor=2, weight_decay=0.03, **kw
        )
        K.set_mode(mode)
        try:
            for t in range(3):
                gen = torch.Generator().manual_seed(t)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                opt.step()
        finally:
            K.set_mode(None)
        return [t.detach().clone() for p in params for t in (p, *opt.state[p].values())]

    for kw in ({}, {"clipping_threshold": 0.5, "caution": True, "corrected_weight_decay": True}):
        dtypes.clear()
        got = run(False, torch.float32, **kw)
        assert set(dtypes) == {torch.float32}
        want = run(True, torch.float32, **kw)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"{kw}: tensor {i} differs"
    dtypes.clear()
    run(False, torch.float64)
    assert set(dtypes) == {torch.float64}
