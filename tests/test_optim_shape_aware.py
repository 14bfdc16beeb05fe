"""Options, defaults and bad input of the shape-aware optimizers (the table covers the maths)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import distopt.optim as do
from tests.problems import make_params, quadratic_loss, run_quadratic
from tests.references import load_timm_optim, load_transformers_optim
from tests.references_shape import RefAdafactor, RefAdamP, RefSGDP
from tests.shard_sim import ShardedSim

# --------------------------------------------------------------------------- signatures


def _seed(kind, name):
    if kind == "hf":
        mod = load_transformers_optim()
        return None if mod is None else getattr(mod, name)
    mod = load_timm_optim(kind)
    return None if mod is None else getattr(mod, name)


@pytest.mark.parametrize(
    "ours,kind,name",
    [
        (do.Adafactor, "hf", "Adafactor"),
        (do.AdafactorTimm, "adafactor", "Adafactor"),
        (do.AdamP, "adamp", "AdamP"),
        (do.SGDP, "sgdp", "SGDP"),
        (do.Lars, "lars", "Lars"),
        (do.NvNovoGrad, "nvnovograd", "NvNovoGrad"),
    ],
)
def test_signature_and_defaults_match_the_seed(ours, kind, name):
    seed = _seed(kind, name)
    if seed is None:
        pytest.skip("seed library not installed")
    a = inspect.signature(ours).parameters
    b = inspect.signature(seed).parameters
    assert list(a) == [n for n in b if n != "foreach"], "same parameters in the same order"
    for n, p in a.items():
        if n == "params" or (ours is do.SGDP and n == "lr"):  # timm's `required` sentinel
            continue
        assert p.default == b[n].default, f"{ours.__name__}.{n}: {p.default!r} != {b[n].default!r}"
    if ours is do.SGDP:
        assert a["lr"].default is inspect.Parameter.empty


# --------------------------------------------------------------------------- bad input

_P = [torch.nn.Parameter(torch.zeros(3, 2))]

BAD = [
    (do.Adafactor, dict(lr=1e-2), ValueError),  # lr with relative_step=True
    (do.Adafactor, dict(warmup_init=True, relative_step=False, lr=1e-2), ValueError),
    (do.Adafactor, dict(relative_step=False), ValueError),  # no lr
    (do.Adafactor, dict(relative_step=False, lr=-1.0), ValueError),
    (do.Adafactor, dict(relative_step=False, lr=float("nan")), ValueError),
    (do.Adafactor, dict(eps=1e-30), ValueError),
    (do.Adafactor, dict(eps=(-1.0, 1e-3)), ValueError),
    (do.Adafactor, dict(clip_threshold=0.0), ValueError),
    (do.Adafactor, dict(decay_rate=0.5), ValueError),
    (do.Adafactor, dict(beta1=1.0), ValueError),
    (do.Adafactor, dict(weight_decay=-0.1), ValueError),
    (do.Adafactor, dict(betas=(0.9, 0.99)), TypeError),
    (do.AdafactorTimm, dict(lr=1e-2, warmup_init=True), ValueError),
    (do.AdafactorTimm, dict(lr=-1e-2), ValueError),
    (do.AdafactorTimm, dict(eps=-1.0), ValueError),
    (do.AdafactorTimm, dict(eps_scale=-1.0), ValueError),
    (do.AdafactorTimm, dict(betas=(1.5, 0.9)), ValueError),
    (do.AdafactorTimm, dict(min_dim_size_to_factor=-1), ValueError),
    (do.AdafactorTimm, dict(decay_rate=float("inf")), ValueError),
    (do.AdafactorTimm, dict(relative_step=True), TypeError),
    (do.AdamP, dict(lr=-1.0), ValueError),
    (do.AdamP, dict(betas=(0.9, 1.0)), ValueError),
    (do.AdamP, dict(eps=-1e-8), ValueError),
    (do.AdamP, dict(weight_decay=-1.0), ValueError),
    (do.AdamP, dict(delta=-0.1), ValueError),
    (do.AdamP, dict(wd_ratio=-0.1), ValueError),
    (do.AdamP, dict(momentum=0.9), TypeError),
    (do.SGDP, dict(), TypeError),  # lr is required
    (do.SGDP, dict(lr=-0.1), ValueError),
    (do.SGDP, dict(lr=0.1, momentum=-0.9), ValueError),
    (do.SGDP, dict(lr=0.1, momentum=1.0, weight_decay=0.1), ValueError),
    (do.SGDP, dict(lr=0.1, betas=(0.9, 0.9)), TypeError),
    (do.Lars, dict(lr=-1.0), ValueError),
    (do.Lars, dict(momentum=-0.1), ValueError),
    (do.Lars, dict(weight_decay=-0.1), ValueError),
    (do.Lars, dict(trust_coeff=-1.0), ValueError),
    (do.Lars, dict(nesterov=True), ValueError),  # no momentum
    (do.Lars, dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError),
    (do.Lars, dict(foreach=True), TypeError),
    (do.NvNovoGrad, dict(lr=float("inf")), ValueError),
    (do.NvNovoGrad, dict(betas=(-0.1, 0.9)), ValueError),
    (do.NvNovoGrad, dict(eps=-1.0), ValueError),
    (do.NvNovoGrad, dict(weight_decay=-1.0), ValueError),
    (do.NvNovoGrad, dict(lr=0.0, decoupled_decay=True, corrected_weight_decay=True), ValueError),
    (do.NvNovoGrad, dict(bias_correction=True), TypeError),
]


@pytest.mark.parametrize("cls,kw,exc", BAD, ids=[f"{c.__name__}-{'-'.join(k) or 'nolr'}-{i}" for i, (c, k, _) in enumerate(BAD)])
def test_bad_input_raises(cls, kw, exc):
    with pytest.raises(exc):
        cls(_P, **kw)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: do.Adafactor(p),
        lambda p: do.AdafactorTimm(p),
        lambda p: do.AdamP(p),
        lambda p: do.SGDP(p, lr=0.1),
        lambda p: do.Lars(p),
        lambda p: do.NvNovoGrad(p),
    ],
    ids=["adafactor", "adafactor-timm", "adamp", "sgdp", "lars", "nvnovograd"],
)
def test_sparse_gradients_raise(make):
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        make(emb.parameters()).step()


# --------------------------------------------------------------------------- Adafactor

# Shapes whose dims exceed timm's default min_dim_size_to_factor (16): a conv kernel factored
# over (out, in) = dims (0, 1), a matrix, a 3-D tensor factored over its last two dims, one
# whose leading dim is too small for (0, 1), a vector and a scalar.
BIG_SHAPES = [(20, 18, 3, 3), (17, 33), (3, 20, 19), (18, 4, 17, 20), (40,), ()]


def _big_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in BIG_SHAPES]


def test_adafactor_state_layout_and_sharding_declarations():
    hf, tm = do.Adafactor(_big_params()), do.AdafactorTimm(_big_params())
    for opt in (hf, tm):
        params = opt.param_groups[0]["params"]
        run_quadratic(opt, params, 1)
    expect = {  # shape -> (hf row, hf col, timm row, timm col), None: unfactored
        (20, 18, 3, 3): ((20, 18, 3), (20, 18, 3), (20, 3, 3), (18, 3, 3)),
        (17, 33): ((17,), (33,), (17,), (33,)),
        (3, 20, 19): ((3, 20), (3, 19), (3, 20), (3, 19)),
        (18, 4, 17, 20): ((18, 4, 17), (18, 4, 20), (18, 4, 17), (18, 4, 20)),
        (40,): (None, None, None, None),
        (): (None, None, None, None),
    }
    for opt, off in ((hf, 0), (tm, 2)):
        for p in opt.param_groups[0]["params"]:
            st = opt.state[p]
            row, col = expect[tuple(p.shape)][off : off + 2]
            assert st["step"].dtype == torch.float32 and st["RMS"].dim() == 0
            assert "exp_avg" not in st  # no beta1
            if row is None:
                assert set(st) == {"step", "RMS", "exp_avg_sq"}
                assert opt.state_is_sharded("exp_avg_sq", st["exp_avg_sq"], p.shape) == (p.dim() > 0)
                continue
            assert set(st) == {"step", "RMS", "exp_avg_sq_row", "exp_avg_sq_col"}
            assert tuple(st["exp_avg_sq_row"].shape) == row and tuple(st["exp_avg_sq_col"].shape) == col
            assert opt.state_is_sharded("exp_avg_sq_row", st["exp_avg_sq_row"], p.shape)
            col_is_mean_over_dim0 = p.dim() == 2 or (opt is tm and tuple(p.shape) == (20, 18, 3, 3))
            assert opt.state_is_sharded("exp_avg_sq_col", st["exp_avg_sq_col"], p.shape) != col_is_mean_over_dim0
            for name in ("step", "RMS"):
                assert not opt.state_is_sharded(name, st[name], p.shape)


@pytest.mark.parametrize(
    "ours,peer",
    [
        (lambda p: do.AdafactorTimm(p), lambda m, p: m.Adafactor(p)),
        (lambda p: do.AdafactorTimm(p, lr=1e-2, betas=(0.9, 0.99), caution=True, weight_decay=0.1),
         lambda m, p: m.Adafactor(p, lr=1e-2, betas=(0.9, 0.99), caution=True, weight_decay=0.1)),
        (lambda p: do.Adafactor(p, warmup_init=True), lambda m, p: m.Adafactor(p, warmup_init=True)),
        (lambda p: do.Adafactor(p, lr=1e-2, relative_step=False, beta1=0.5),
         lambda m, p: m.Adafactor(p, lr=1e-2, relative_step=False, beta1=0.5)),
    ],
    ids=["timm-defaults", "timm-ext-caution", "hf-warmup", "hf-ext-scaled"],
)
def test_adafactor_default_factoring_matches_peer_and_shards(ours, peer):
    timm_flavour = isinstance(ours([torch.nn.Parameter(torch.zeros(1))]), do.AdafactorTimm)
    mod = load_timm_optim("adafactor") if timm_flavour else load_transformers_optim()
    if mod is None:
        pytest.skip("peer library not installed")
    p1, p2 = _big_params(), _big_params()
    o1, o2 = ours(p1), peer(mod, p2)
    run_quadratic(o1, p1, 6)
    run_quadratic(o2, p2, 6)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5)
    if timm_flavour:  # timm writes the relative-step lr of the last parameter into the group
        assert o1.param_groups[0]["lr"] == pytest.approx(o2.param_groups[0]["lr"], rel=1e-5)
    # and the same under dim-0 sharding over 3 simulated ranks (dims (0, 1) need reductions)
    sim = ShardedSim(ours, [p.detach() for p in _big_params()], world=3)
    for t in range(6):
        full = [torch.nn.Parameter(x.clone()) for x in sim.gather()]
        sim.set_grads(torch.autograd.grad(quadratic_loss(full, t), full))
        sim.step()
    for a, b in zip(p1, sim.gather()):
        torch.testing.assert_close(b, a.detach(), rtol=1e-5, atol=1e-5)
    phases = 3 if sim.opts[0].param_groups[0].get("caution") else 2  # caution: the mask mean
    assert all(n == [phases] * 3 for n in sim.reductions_per_step)
    for o in sim.opts:  # the global parameter RMS: every rank reports the unsharded lrs
        assert o.relative_step_lrs() == pytest.approx(o1.relative_step_lrs(), rel=1e-5)


def test_relative_step_lrs_agree_with_transformers_schedule():
    mod = load_transformers_optim()
    if mod is None:
        pytest.skip("transformers not installed")
    p1, p2 = make_params(), make_params()
    ours = do.Adafactor([{"params": p1[:3]}, {"params": p1[3:], "warmup_init": True}])
    theirs = mod.Adafactor([{"params": p2[:3]}, {"params": p2[3:], "warmup_init": True}])
    sched = mod.AdafactorSchedule(theirs)
    assert ours.relative_step_lrs() == [None, None]
    for t in range(5):
        run_quadratic(ours, p1, 1, start=t)
        run_quadratic(theirs, p2, 1, start=t)
        sched.step()
        # transformers reports 0-d tensors: compared as floats (pytest.approx of a list of
        # tensors is not an element-wise float comparison)
        want = [float(x) for x in sched.get_last_lr()]
        assert ours.relative_step_lrs() == pytest.approx(want, rel=1e-6)
    # the distopt schedule reads the same hook
    try:
        from distopt.schedules import AdafactorSchedule
    except ImportError:
        return
    s2 = AdafactorSchedule(ours)
    run_quadratic(ours, p1, 1, start=5)
    s2.step()
    assert s2.get_last_lr() == pytest.approx(ours.relative_step_lrs())


def test_relative_step_lr_function():
    from distopt.optim.adafactor import relative_step_lr

    for t in (1, 2, 10, 10_000, 50_000):
        assert relative_step_lr(t) == min(1e-2, 1 / math.sqrt(t))
        assert relative_step_lr(t, True) == min(1e-6 * t, 1 / math.sqrt(t))


def test_adafactor_external_lr_and_param_scale_per_flavour():
    # transformers scales an external lr by the parameter RMS; timm does not
    p1, p2, p3 = make_params(), make_params(), make_params()
    run_quadratic(do.Adafactor(p1, lr=1e-2, relative_step=False, scale_parameter=True), p1, 4)
    run_quadratic(do.AdafactorTimm(p2, lr=1e-2, scale_parameter=True), p2, 4)
    r1 = RefAdafactor(p3, lr=1e-2, relative_step=False, scale_parameter=True, min_dim=None)
    run_quadratic(r1, p3, 4)
    for a, b in zip(p1, p3):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    p4 = make_params()
    run_quadratic(RefAdafactor(p4, lr=1e-2, relative_step=False, min_dim=16, scale_external=False), p4, 4)
    for a, b in zip(p2, p4):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(p1[0], p2[0])


# --------------------------------------------------------------------------- AdamP / SGDP


def _projection_problem(t):
    """Gradients of a scale-invariant loss: the channels of W are normalised (the channel cosines
    are 0: channel projection) and V as a whole is normalised (the layer cosine is 0 while single
    channels are not orthogonal to their gradients: layer projection)."""

    def loss(params):
        w, v, b = params
        g = torch.Generator().manual_seed(1000 + t)
        cw = torch.randn(w.shape, generator=g)
        cv = torch.randn(v.shape, generator=g)
        cb = torch.randn(b.shape, generator=g)
        wn = w / w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
        vn = v / v.norm()
        return (cw * wn).sum() + (cv * vn).sum() + (cb * b).sum()

    return loss


def _projection_params():
    g = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(5, 3, 2), (7, 4), (6,)]]


@pytest.mark.parametrize(
    "make,ref",
    [
        (lambda p: do.AdamP(p, lr=1e-2, weight_decay=0.1), lambda p: RefAdamP(p, lr=1e-2, weight_decay=0.1)),
        (lambda p: do.AdamP(p, lr=1e-2, weight_decay=0.1, nesterov=True, caution=True),
         lambda p: RefAdamP(p, lr=1e-2, weight_decay=0.1, nesterov=True, caution=True)),
        (lambda p: do.SGDP(p, lr=0.1, momentum=0.9, weight_decay=0.1),
         lambda p: RefSGDP(p, lr=0.1, momentum=0.9, weight_decay=0.1)),
        (lambda p: do.SGDP(p, lr=0.1, momentum=0.9, weight_decay=0.1, caution=True, nesterov=True),
         lambda p: RefSGDP(p, lr=0.1, momentum=0.9, weight_decay=0.1, caution=True, nesterov=True)),
    ],
    ids=["adamp", "adamp-nesterov-caution", "sgdp", "sgdp-nesterov-caution"],
)
def test_projection_channel_and_layer_paths_sharded(make, ref):
    steps = 5

    def run(opt, params):
        for t in range(steps):
            opt.zero_grad()
            _projection_problem(t)(params).backward()
            opt.step()

    p1, p2, p3 = _projection_params(), _projection_params(), _projection_params()
    run(make(p1), p1)
    run(ref(p2), p2)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the projections mattered: without them (delta = 0) the result differs for W and V
    no_proj = make(p3)
    for g in no_proj.param_groups:
        g["delta"] = 0.0
    run(no_proj, p3)
    assert not torch.allclose(p1[0], p3[0]) and not torch.allclose(p1[1], p3[1])
    # V's channels are not all orthogonal to their gradients: the layer test decided
    v = _projection_params()[1]
    gv = torch.autograd.grad(_projection_problem(0)(_projection_params()[:1] + [v] + _projection_params()[2:]), v)[0]
    cos = torch.nn.functional.cosine_similarity(gv, v.detach(), dim=1, eps=1e-8).abs()
    assert float(cos.max()) >= 0.1 / math.sqrt(v.shape[1])
    # under sharding over 3 simulated ranks (V: 7 rows, W: 5 rows, uneven) the same
    sim = ShardedSim(make, [p.detach() for p in _projection_params()], world=3)
    for t in range(steps):
        full = [torch.nn.Parameter(x.clone()) for x in sim.gather()]
        sim.set_grads(torch.autograd.grad(_projection_problem(t)(full), full))
        sim.step()
    for a, b in zip(p1, sim.gather()):
        torch.testing.assert_close(b, a.detach(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Lars / NvNovoGrad


def test_lars_state_and_plain_sgd_without_adaptation():
    params = make_params()
    opt = do.Lars(params, lr=0.1)
    run_quadratic(opt, params, 2)
    assert all(len(opt.state[p]) == 0 for p in params)  # no momentum: no state
    p2 = make_params()
    run_quadratic(torch.optim.SGD(p2, lr=0.1), p2, 2)
    for a, b in zip(params, p2):
        torch.testing.assert_close(a, b)
    params = make_params()
    opt = do.Lars(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    run_quadratic(opt, params, 1)
    assert set(opt.state[params[0]]) == {"momentum_buffer"}


def test_nvnovograd_layer_second_moment_is_a_replicated_scalar():
    params = make_params()
    opt = do.NvNovoGrad(params, amsgrad=True)
    run_quadratic(opt, params, 2)
    for p in params:
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert st["exp_avg_sq"].dim() == 0 and st["exp_avg_sq"].dtype == torch.float32
        assert not opt.state_is_sharded("exp_avg_sq", st["exp_avg_sq"], p.shape)
        assert opt.state_is_sharded("exp_avg", st["exp_avg"], p.shape) == (p.dim() > 0)
    assert opt.param_groups[0]["max_lr_snapshot"] == 1e-3
