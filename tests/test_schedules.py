"""Learning-rate schedules: formulas, golden tables, transformers parity, exact resume."""

from __future__ import annotations

import functools
import io
import math
import pickle
import warnings

import pytest
import torch

import distopt.schedules as S

LR = 0.1
SCALES = (1.0, 0.5, 0.25)  # layer-decay style lr_scale per param group


def make_optimizer(lr: float = LR, scales=SCALES) -> torch.optim.Optimizer:
    """SGD with one group per scale; the factory convention: group lr = lr * lr_scale."""
    groups = [
        {"params": [torch.zeros(2, requires_grad=True)], "lr": lr * s, "lr_scale": s}
        for s in scales
    ]
    return torch.optim.SGD(groups, lr=lr)


# --------------------------------------------------------------------------- references
# Independent closed forms (peak lr = 1) used to check every schedule at many points.


def ref_warm(s, w):
    return s / w if s < w else None


def ref_constant(s, w, t, **k):
    return 1.0


def ref_constant_warm(s, w, t, **k):
    r = ref_warm(s, w)
    return 1.0 if r is None else r


def ref_linear(s, w, t, **k):
    r = ref_warm(s, w)
    if r is not None:
        return r
    return max(0.0, (t - s) / max(1, t - w))


def ref_cosine(s, w, t, num_cycles=0.5, **k):
    r = ref_warm(s, w)
    if r is not None:
        return r
    p = (s - w) / max(1, t - w)
    return max(0.0, (1 + math.cos(2 * math.pi * num_cycles * p)) / 2)


def ref_restarts(s, w, t, num_cycles=1, **k):
    r = ref_warm(s, w)
    if r is not None:
        return r
    p = (s - w) / max(1, t - w)
    if p >= 1:
        return 0.0
    return (1 + math.cos(math.pi * math.modf(num_cycles * p)[0])) / 2


def ref_poly(s, w, t, lr_end=1e-7, power=1.0, **k):
    r = ref_warm(s, w)
    if r is not None:
        return r
    if s > t or t == w:
        return lr_end / LR
    return (lr_end + (LR - lr_end) * (1 - (s - w) / (t - w)) ** power) / LR


def ref_isqrt(s, w, t, timescale=None, **k):
    r = ref_warm(s, w)
    if r is not None:
        return r
    ts = timescale if timescale is not None else (w or 10_000)
    return math.sqrt(ts / (s - w + ts))


def ref_cos_min(s, w, t, num_cycles=0.5, min_lr_rate=None, min_lr=None, **k):
    r = ref_warm(s, w)
    if r is not None:
        return r
    m = min_lr_rate if min_lr_rate is not None else min_lr / LR
    return m + (1 - m) * ref_cosine(s, w, t, num_cycles)


def ref_wsd(s, w, t, num_decay_steps, num_stable_steps=None, warmup_type="linear",
            decay_type="cosine", min_lr_ratio=0.0, num_cycles=0.5, **k):
    st = num_stable_steps if num_stable_steps is not None else t - w - num_decay_steps
    m = min_lr_ratio
    if s < w:
        p = s / w
        f = {"linear": p, "cosine": (1 - math.cos(math.pi * p)) / 2,
             "1-sqrt": 1 - math.sqrt(1 - p)}[warmup_type]
        return m + (1 - m) * f
    if s < w + st:
        return 1.0
    if s < w + st + num_decay_steps:
        p = (s - w - st) / num_decay_steps
        f = {"linear": 1 - p, "cosine": (1 + math.cos(2 * math.pi * num_cycles * p)) / 2,
             "1-sqrt": 1 - math.sqrt(p)}[decay_type]
        return m + (1 - m) * f
    return m


REFS = {
    "constant": ref_constant,
    "constant_with_warmup": ref_constant_warm,
    "linear": ref_linear,
    "cosine": ref_cosine,
    "cosine_with_restarts": ref_restarts,
    "polynomial": ref_poly,
    "inverse_sqrt": ref_isqrt,
    "cosine_with_min_lr": ref_cos_min,
    "warmup_stable_decay": ref_wsd,
}

KWARGS = {
    "constant": [{}],
    "constant_with_warmup": [{}],
    "linear": [{}],
    "cosine": [{}, {"num_cycles": 1.0}, {"num_cycles": 2.5}, {"num_cycles": 0.25}],
    "cosine_with_restarts": [{}, {"num_cycles": 3}, {"num_cycles": 2}],
    "polynomial": [{}, {"power": 2.0}, {"power": 0.5, "lr_end": 1e-3}],
    "inverse_sqrt": [{}, {"timescale": 7}, {"timescale": 100}],
    "cosine_with_min_lr": [{"min_lr_rate": 0.1}, {"min_lr": 1e-3}, {"min_lr_rate": 0.5, "num_cycles": 1.0}],
    "warmup_stable_decay": [
        {"num_decay_steps": 4},
        {"num_decay_steps": 5, "decay_type": "linear", "warmup_type": "cosine", "min_lr_ratio": 0.1},
        {"num_decay_steps": 3, "decay_type": "1-sqrt", "warmup_type": "1-sqrt"},
        {"num_decay_steps": 2, "num_stable_steps": 3, "min_lr_ratio": 0.05},
    ],
}

POINTS = [(0, 10), (1, 10), (3, 10), (10, 37), (5, 100), (10, 10)]


def _cases():
    for name, kws in KWARGS.items():
        for kw in kws:
            for w, t in POINTS:
                if name == "warmup_stable_decay":
                    need = w + kw["num_decay_steps"] + kw.get("num_stable_steps", 0)
                    if need > t:
                        continue
                    if "num_stable_steps" in kw:
                        t = w + kw["num_stable_steps"] + kw["num_decay_steps"]
                yield name, w, t, kw


@pytest.mark.parametrize("name", sorted(REFS))
def test_formula_at_many_points(name):
    n = 0
    for nm, w, t, kw in _cases():
        if nm != name:
            continue
        opt = make_optimizer()
        sched = S.get_scheduler(name, opt, w, t, kw)
        for step in range(t + 6):
            want = REFS[name](step, w, t, **kw)
            assert sched.lr_at(step) == pytest.approx(LR * want, rel=1e-9, abs=1e-15), (w, t, kw, step)
            assert sched.factor_at(step) == pytest.approx(want, rel=1e-9, abs=1e-14)
            got = sched.get_last_lr()
            for scale, lr in zip(SCALES, got):
                assert lr == pytest.approx(LR * scale * want, rel=1e-9, abs=1e-15), (w, t, kw, step)
            assert sched.lrs_at(step) == got
            opt.step()
            sched.step()
            n += 1
    assert n > 50


def test_pure_functions_match_schedulers():
    assert S.constant_factor(5) == 1.0
    assert S.linear_with_warmup_factor(5, num_warmup_steps=2, num_training_steps=10) == 5 / 8
    assert S.cosine_with_warmup_factor(2, num_warmup_steps=2, num_training_steps=10) == 1.0
    assert S.wsd_factor(100, num_warmup_steps=1, num_stable_steps=1, num_decay_steps=1,
                        min_lr_ratio=0.2) == 0.2


# --------------------------------------------------------------------------- golden tables

GOLDEN = {  # lr 10, 10 steps, warmup 2, total 10 (the transformers test table)
    "constant": ({}, [10.0] * 10),
    "constant_with_warmup": ({}, [0.0, 5.0] + [10.0] * 8),
    "linear": ({}, [0.0, 5.0, 10.0, 8.75, 7.5, 6.25, 5.0, 3.75, 2.5, 1.25]),
    "cosine": ({}, [0.0, 5.0, 10.0, 9.61, 8.53, 6.91, 5.0, 3.08, 1.46, 0.38]),
    "cosine_with_restarts": ({"num_cycles": 2},
                             [0.0, 5.0, 10.0, 8.53, 5.0, 1.46, 10.0, 8.53, 5.0, 1.46]),
    "polynomial": ({"power": 2.0, "lr_end": 1e-7},
                   [0.0, 5.0, 10.0, 7.656, 5.625, 3.906, 2.5, 1.406, 0.625, 0.156]),
    "inverse_sqrt": ({}, [0.0, 5.0, 10.0, 8.165, 7.071, 6.325, 5.774, 5.345, 5.0, 4.714]),
    "cosine_with_min_lr": ({"min_lr_rate": 0.1},
                           [0.0, 5.0, 10.0, 9.657, 8.682, 7.222, 5.5, 3.778, 2.318, 1.343]),
    "warmup_stable_decay": ({"num_decay_steps": 2},
                            [0.0, 5.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 5.0]),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_table(name):
    kw, want = GOLDEN[name]
    opt = torch.optim.AdamW([torch.zeros(3, requires_grad=True)], lr=10.0)
    sched = S.get_scheduler(name, opt, 2, 10, kw)
    got = []
    for _ in range(10):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert got == pytest.approx(want, abs=1e-2)
    assert [sched.lr_at(s) for s in range(10)] == got


def test_golden_constant_warmup_4():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=10.0)
    sched = S.get_constant_schedule_with_warmup(opt, num_warmup_steps=4)
    assert [sched.lr_at(s) for s in range(6)] == [0.0, 2.5, 5.0, 7.5, 10.0, 10.0]


# --------------------------------------------------------------------------- transformers


def _run(sched, opt, n=30):
    lrs = []
    for _ in range(n):
        lrs.append(list(sched.get_last_lr()))
        opt.step()
        sched.step()
    lrs.append(list(sched.get_last_lr()))
    return lrs


@pytest.mark.parametrize("name", sorted(REFS))
def test_matches_transformers(name):
    T = pytest.importorskip("transformers.optimization")
    for nm, w, t, kw in _cases():
        if nm != name or (name == "polynomial" and w == t):  # transformers divides by 0
            continue
        mine_opt, ref_opt = make_optimizer(), make_optimizer()
        mine = S.get_scheduler(name, mine_opt, w, t, kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = T.get_scheduler(name, ref_opt, w, t, kw)
        assert _run(mine, mine_opt, t + 5) == _run(ref, ref_opt, t + 5), (w, t, kw)


def test_direct_factories_match_transformers():
    T = pytest.importorskip("transformers.optimization")
    calls = [
        ("get_constant_schedule", (), {}),
        ("get_constant_schedule_with_warmup", (3,), {}),
        ("get_linear_schedule_with_warmup", (3, 20), {}),
        ("get_cosine_schedule_with_warmup", (3, 20), {"num_cycles": 1.5}),
        ("get_cosine_with_hard_restarts_schedule_with_warmup", (3, 20), {"num_cycles": 3}),
        ("get_polynomial_decay_schedule_with_warmup", (3, 20), {"lr_end": 1e-4, "power": 3.0}),
        ("get_inverse_sqrt_schedule", (3,), {"timescale": 5}),
        ("get_cosine_with_min_lr_schedule_with_warmup", (3, 20), {"min_lr": 1e-3}),
        ("get_wsd_schedule", (3, 5), {"num_training_steps": 20, "decay_type": "1-sqrt"}),
    ]
    for fname, args, kw in calls:
        mo, ro = make_optimizer(), make_optimizer()
        mine = getattr(S, fname)(mo, *args, **kw)
        ref = getattr(T, fname)(ro, *args, **kw)
        assert _run(mine, mo, 25) == _run(ref, ro, 25), fname


def test_plateau_matches_torch_and_transformers():
    T = pytest.importorskip("transformers.optimization")
    metrics = [1.0, 0.9, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7] * 3
    kw = {"patience": 2, "factor": 0.5, "cooldown": 1, "min_lr": 1e-3}
    mo, ro = make_optimizer(), make_optimizer()
    mine = S.get_scheduler("reduce_lr_on_plateau", mo, scheduler_specific_kwargs=kw)
    ref = T.get_scheduler("reduce_lr_on_plateau", ro, scheduler_specific_kwargs=kw)
    assert isinstance(mine, torch.optim.lr_scheduler.ReduceLROnPlateau)
    for m in metrics:
        mo.step()
        ro.step()
        mine.step(m)
        ref.step(m)
        assert mine.get_last_lr() == ref.get_last_lr()
    assert mine.get_last_lr()[0] < LR


def test_adafactor_relative_step_matches_transformers():
    T = pytest.importorskip("transformers.optimization")
    for warmup_init in (False, True):
        for step in (1, 2, 10, 99, 10_000, 123_456):
            group = {"lr": None, "relative_step": True, "warmup_init": warmup_init,
                     "scale_parameter": False, "eps": (1e-30, 1e-3)}
            want = T.Adafactor._get_lr(group, {"step": step, "RMS": 1.0})
            assert S.adafactor_relative_step_lr(step, warmup_init) == want


def test_transformers_state_dict_loads_into_ours():
    T = pytest.importorskip("transformers.optimization")
    ro = make_optimizer()
    ref = T.get_cosine_schedule_with_warmup(ro, 3, 30)
    full = _run(ref, ro, 12)
    mo = make_optimizer()
    mine = S.get_cosine_schedule_with_warmup(mo, 3, 30)
    mine.load_state_dict(ref.state_dict())
    assert mine.last_epoch == 12 and mine.get_last_lr() == full[-1]


# --------------------------------------------------------------------------- resume

def _sched_builders():
    """name -> build(optimizer, last_epoch, base_lrs=None) for every stepping schedule."""
    w, t = 4, 24
    b = {}
    for name in sorted(REFS):
        kw = KWARGS[name][1] if len(KWARGS[name]) > 1 else KWARGS[name][0]
        b[name] = functools.partial(_by_name, name, w, t, kw)
    decay = functools.partial(S.polynomial_decay_lr, initial_lr=LR, decay_steps=t - w,
                              end_lr=1e-3, power=2.0)
    b["warmup"] = lambda opt, le, base_lrs=None: S.WarmUp(opt, LR, decay, w, power=2.0,
                                                          last_epoch=le, base_lrs=base_lrs)
    b["tf_style"] = lambda opt, le, base_lrs=None: S.create_tf_style_schedule(
        opt, LR, t, w, 0.1, last_epoch=le, base_lrs=base_lrs)
    return b


def _by_name(name, w, t, kw, opt, last_epoch, base_lrs=None):
    return S.get_scheduler(name, opt, w, t, kw, last_epoch=last_epoch, base_lrs=base_lrs)


BUILDERS = _sched_builders()


def _continue(sched, opt, upto):
    lrs = [list(sched.get_last_lr())]
    while sched.last_epoch < upto:
        opt.step()
        sched.step()
        lrs.append(list(sched.get_last_lr()))
    return lrs


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_resume_at_every_step(name):
    build = BUILDERS[name]
    n = 30
    opt = make_optimizer()
    sched = build(opt, -1)
    full, opt_states, sched_states = [list(sched.get_last_lr())], [], []
    for _ in range(n):
        opt_states.append(opt.state_dict())
        sched_states.append(sched.state_dict())
        opt.step()
        sched.step()
        full.append(list(sched.get_last_lr()))
    opt_states.append(opt.state_dict())
    sched_states.append(sched.state_dict())

    for k in range(n + 1):
        want = full[k:]
        # torch's convention: after k steps, rebuild with last_epoch=k-1 (-1 = fresh when k=0)
        # 1. on a fresh optimizer (scheduler built before loading the optimizer state)
        o1 = make_optimizer()
        s1 = build(o1, k - 1)
        assert s1.last_epoch == k
        assert _continue(s1, o1, n) == want, ("last_epoch, fresh", k)
        # 1b. on the restored optimizer, initial_lr included (torch's own resume recipe)
        o1 = make_optimizer()
        o1.load_state_dict(opt_states[k])
        assert _continue(build(o1, k - 1), o1, n) == want, ("last_epoch, restored", k)
        # 2. groups restored from a (sharded) checkpoint that dropped initial_lr
        o2 = make_optimizer()
        st = opt_states[k]
        for g in st["param_groups"]:
            g.pop("initial_lr", None)
        o2.load_state_dict(st)
        # k == 0 is a fresh start, whose base is the current lr: lrs_at(0) here (0 during
        # warmup), so the documented remedy is to say the base.
        base = LR if k == 0 else None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fallback must not even warn here
            s2 = build(o2, k - 1, base_lrs=base)
        assert _continue(s2, o2, n) == want, ("last_epoch, no initial_lr", k)
        # 3. a fresh scheduler loading the saved state (through a torch.save round trip)
        o3 = make_optimizer()
        s3 = build(o3, -1)
        buf = io.BytesIO()
        torch.save(sched_states[k], buf)
        buf.seek(0)
        s3.load_state_dict(torch.load(buf, weights_only=True))
        assert [g["lr"] for g in o3.param_groups] == full[k]
        assert _continue(s3, o3, n) == want, ("state_dict", k)


def test_plateau_resume_at_every_step():
    metrics = [1.0, 0.9, 0.9, 0.9, 0.9, 0.85, 0.85, 0.85, 0.85, 0.85] * 3
    kw = {"patience": 1, "factor": 0.5}

    def run(sched, opt, ms):
        out = []
        for m in ms:
            opt.step()
            sched.step(m)
            out.append(list(sched.get_last_lr()))
        return out

    opt = make_optimizer()
    sched = S.get_scheduler("reduce_lr_on_plateau", opt, scheduler_specific_kwargs=kw)
    states, full = [], []
    for m in metrics:
        states.append(pickle.loads(pickle.dumps(sched.state_dict())))
        full += run(sched, opt, [m])
    for k in range(len(metrics)):
        o = make_optimizer()  # fresh lrs: the state must restore them
        s = S.get_scheduler("reduce_lr_on_plateau", o, scheduler_specific_kwargs=kw)
        s.load_state_dict(states[k])
        assert run(s, o, metrics[k:]) == full[k:], k
    assert sched.lr_at(len(metrics)) == full[-1][0]
    assert sched.lr_at(0) == LR
    with pytest.raises(ValueError, match="metrics"):
        sched.lr_at(len(metrics) + 1)


def test_resume_warns_when_base_lr_cannot_be_recovered():
    opt = make_optimizer()
    opt.param_groups[1]["lr"] = 0.0123  # neither the base nor the scheduled lr
    with pytest.warns(UserWarning, match="base_lrs"):
        S.get_linear_schedule_with_warmup(opt, 2, 10, last_epoch=5)
    opt = make_optimizer()
    opt.param_groups[1]["lr"] = 0.0123
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = S.get_linear_schedule_with_warmup(opt, 2, 10, last_epoch=5, base_lrs=[0.1, 0.2, 0.3])
    assert s.base_lrs == [0.1, 0.2, 0.3]
    s = S.get_linear_schedule_with_warmup(make_optimizer(), 2, 10, last_epoch=5, base_lrs=1.0)
    assert s.base_lrs == [1.0, 0.5, 0.25]


def test_last_epoch_semantics():
    """torch's convention: the constructor steps once, so last_epoch=N lands on step N + 1."""
    opt = make_optimizer()
    s = S.get_linear_schedule_with_warmup(opt, 2, 10, last_epoch=7)
    assert s.last_epoch == 8
    assert s.get_last_lr() == s.lrs_at(8)
    assert [g["lr"] for g in opt.param_groups] == s.lrs_at(8)
    assert S.get_linear_schedule_with_warmup(make_optimizer(), 2, 10, last_epoch=0).last_epoch == 1
    fresh = S.get_linear_schedule_with_warmup(make_optimizer(), 2, 10)
    assert fresh.last_epoch == 0 and fresh.get_last_lr() == fresh.lrs_at(0) == [0.0] * 3


def test_resume_check_uses_the_resumed_step():
    """Without initial_lr, a group lr equal to lrs_at(N + 1) (what the optimizer held after
    N + 1 steps) is recognised; the one of step N is not."""
    for lrs_of, warns in ((lambda s: s.lrs_at(6), False), (lambda s: s.lrs_at(5), True)):
        probe = S.get_linear_schedule_with_warmup(make_optimizer(), 2, 10)
        opt = make_optimizer()
        for g, lr in zip(opt.param_groups, lrs_of(probe)):
            g["lr"] = lr
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            s = S.get_linear_schedule_with_warmup(opt, 2, 10, last_epoch=5)
        assert bool(rec) is warns
        assert s.last_epoch == 6 and s.get_last_lr() == probe.lrs_at(6)


# Each SchedulerType name with the settings used to compare last_epoch against transformers.
PARITY_KWARGS = {
    "constant": {}, "constant_with_warmup": {}, "linear": {}, "cosine": {"num_cycles": 1.5},
    "cosine_with_restarts": {"num_cycles": 2}, "polynomial": {"power": 2.0, "lr_end": 1e-3},
    "inverse_sqrt": {"timescale": 5}, "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 4, "decay_type": "linear"},
}


def _with_initial_lr(opt):
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def _transformers_scheduler(T, name, opt, w, t, kw, last_epoch):
    """transformers' schedule ``name`` built with ``last_epoch`` (its get_scheduler may not
    take that argument; its factories all do)."""
    import inspect

    if "last_epoch" in inspect.signature(T.get_scheduler).parameters:
        return T.get_scheduler(name, opt, w, t, kw, last_epoch=last_epoch)
    fn = T.TYPE_TO_SCHEDULER_FUNCTION[T.SchedulerType(name)]
    params = inspect.signature(fn).parameters
    call = {"num_warmup_steps": w, "num_training_steps": t}
    call = {k: v for k, v in call.items() if k in params}
    return fn(opt, last_epoch=last_epoch, **call, **kw)


@pytest.mark.parametrize("name", sorted(PARITY_KWARGS))
def test_last_epoch_matches_transformers(name):
    T = pytest.importorskip("transformers.optimization")
    w, t, kw = 3, 12, PARITY_KWARGS[name]
    assert set(PARITY_KWARGS) | {"reduce_lr_on_plateau"} == {x.value for x in S.SchedulerType}
    with pytest.raises(KeyError):  # torch/transformers need initial_lr to resume; we don't
        _transformers_scheduler(T, name, make_optimizer(), w, t, kw, 5)
    fresh_ro = make_optimizer()
    full = _run(_transformers_scheduler(T, name, fresh_ro, w, t, kw, -1), fresh_ro, 14)
    for n in (0, 1, 5, 9):
        # ours on groups without initial_lr (no KeyError) and with it (torch's precondition)
        for mo in (make_optimizer(), _with_initial_lr(make_optimizer())):
            ro = _with_initial_lr(make_optimizer())
            ref = _transformers_scheduler(T, name, ro, w, t, kw, n)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                mine = S.get_scheduler(name, mo, w, t, kw, last_epoch=n)
            assert ref.last_epoch == n + 1
            assert mine.last_epoch == ref.last_epoch, n
            assert mine.get_last_lr() == ref.get_last_lr() == full[n + 1], n
            assert [g["lr"] for g in mo.param_groups] == [g["lr"] for g in ro.param_groups]
            assert _run(mine, mo, 3) == _run(ref, ro, 3), n  # and both continue identically


@pytest.mark.parametrize("name", ["warmup", "tf_style"])
def test_last_epoch_matches_torch_lambda_lr(name):
    """The TF-style schedules against torch's own LambdaLR (same multiplier, initial_lr set)."""
    for n in (-1, 0, 1, 5, 9):
        ro = _with_initial_lr(make_optimizer())
        ref = torch.optim.lr_scheduler.LambdaLR(ro, BUILDERS[name](make_optimizer(), -1).factor_at,
                                                last_epoch=n)
        mo = make_optimizer()
        mine = BUILDERS[name](mo, n)
        assert mine.last_epoch == ref.last_epoch == n + 1
        assert mine.get_last_lr() == pytest.approx(ref.get_last_lr(), rel=1e-14, abs=1e-18)
        assert mine.get_last_lr() == mine.lrs_at(n + 1)


def test_plateau_last_epoch():
    """torch's plateau counts step(metric) calls from 0 and takes no last_epoch; ours maps
    last_epoch=N to the counter after N + 1 steps, like every LRScheduler, lrs untouched."""
    for n in (-1, 0, 1, 5, 9):
        ro = make_optimizer()
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ro)
        for i in range(n + 1):
            ref.step(1.0 - i)  # improving: no lr change
        mo = make_optimizer()
        mine = S.get_scheduler("reduce_lr_on_plateau", mo, last_epoch=n)
        assert mine.last_epoch == ref.last_epoch == n + 1
        assert mine.get_last_lr() == ref.get_last_lr() == [LR * s for s in SCALES]
        mine.step(0.5)
        assert mine.last_epoch == n + 2


# --------------------------------------------------------------------------- per-group


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_lr_scale_groups(name):
    opt = make_optimizer()
    sched = BUILDERS[name](opt, -1)
    for step in range(30):
        for scale, g in zip(SCALES, opt.param_groups):
            assert g["lr"] == pytest.approx(sched.lr_at(step) * scale, rel=1e-12, abs=1e-18)
            assert g["initial_lr"] == LR * scale
        opt.step()
        sched.step()


def test_lr_scale_with_torch_schedulers():
    for make in (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
                 lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 5)):
        opt = make_optimizer()
        sched = make(opt)
        for _ in range(12):
            lrs = sched.get_last_lr()
            for scale, lr in zip(SCALES, lrs):
                assert lr == pytest.approx(lrs[0] * scale, rel=1e-12)
            opt.step()
            sched.step()


def test_works_inside_torch_sequential_lr():
    opt = make_optimizer()
    a = S.get_constant_schedule(opt)
    b = S.get_linear_schedule_with_warmup(opt, 0, 10)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [a, b], milestones=[3])
    lrs = []
    for _ in range(8):
        lrs.append(seq.get_last_lr()[0])
        opt.step()
        seq.step()
    assert lrs[:3] == [LR] * 3
    assert lrs[3:] == pytest.approx([LR * (10 - i) / 10 for i in range(5)])


# --------------------------------------------------------------------------- pickle


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_pickle_round_trip(name):
    opt = make_optimizer()
    sched = BUILDERS[name](opt, -1)
    for _ in range(5):
        opt.step()
        sched.step()
    if name == "warmup":  # its decay fn is a partial of a module-level function: picklable
        pass
    clone = pickle.loads(pickle.dumps(sched))
    assert clone.last_epoch == 5 and clone.get_last_lr() == sched.get_last_lr()
    assert clone.lr_at(17) == sched.lr_at(17)
    for _ in range(5):
        opt.step()
        sched.step()
        clone.optimizer.step()
        clone.step()
        assert clone.get_last_lr() == sched.get_last_lr()
    pickle.loads(pickle.dumps(sched.state_dict()))


def test_adafactor_schedule_hook_and_fallback():
    class HookSGD(torch.optim.SGD):
        def __init__(self, params):
            super().__init__(params, lr=1.0)
            self.n = 0

        def step(self, closure=None):
            self.n += 1

        def relative_step_lrs(self):
            if self.n == 0:
                return None
            return [S.adafactor_relative_step_lr(self.n, False) * (i + 1)
                    for i in range(len(self.param_groups))]

    opt = HookSGD([{"params": [torch.zeros(1, requires_grad=True)]},
                   {"params": [torch.zeros(1, requires_grad=True)]}])
    sched = S.AdafactorSchedule(opt, initial_lr=1e-3)
    assert sched.get_last_lr() == [1e-3, 1e-3]
    assert all("initial_lr" not in g for g in opt.param_groups)
    for k in range(1, 4):
        opt.step()
        sched.step()
        assert sched.get_last_lr() == [min(1e-2, k ** -0.5), 2 * min(1e-2, k ** -0.5)]
    assert sched.lr_at(0) == 1e-3 and sched.lr_at(4) == 1e-2
    assert pickle.loads(pickle.dumps(sched.state_dict()))["last_epoch"] == 3
    resumed = S.get_adafactor_schedule(opt, 1e-3, last_epoch=2)  # after 3 steps: torch's k - 1
    assert resumed.last_epoch == 3 and resumed.get_last_lr() == sched.get_last_lr()
    assert all("initial_lr" not in g for g in opt.param_groups)
    # no hook: initial_lr
    plain = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    s2 = S.AdafactorSchedule(plain)
    assert s2.last_epoch == 0 and S.AdafactorSchedule(plain, last_epoch=4).last_epoch == 5
    s2 = S.AdafactorSchedule(plain)
    plain.step()
    s2.step()
    assert s2.get_last_lr() == [0.0]


def test_adafactor_relative_step_rule():
    assert S.adafactor_relative_step_lr(1, False) == 1e-2
    assert S.adafactor_relative_step_lr(40_000, False) == 1 / 200
    assert S.adafactor_relative_step_lr(50, True) == pytest.approx(5e-5)
    assert S.adafactor_relative_step_lr(0, True) == 0.0
    with pytest.raises(ValueError):
        S.adafactor_relative_step_lr(-1, False)


# --------------------------------------------------------------------------- TF-style pieces


def test_warmup_tf_semantics():
    decay = functools.partial(S.polynomial_decay_lr, initial_lr=1.0, decay_steps=10,
                              end_lr=0.1, power=0.5)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=123.0)  # placeholder lr
    sched = S.WarmUp(opt, initial_learning_rate=2.0, decay_schedule_fn=decay, warmup_steps=4,
                     power=2.0)
    for step in range(20):
        if step < 4:
            want = 2.0 * (step / 4) ** 2
        else:
            d = min(step - 4, 10)
            want = 0.9 * (1 - d / 10) ** 0.5 + 0.1
        assert sched.lr_at(step) == pytest.approx(want, rel=1e-12)
        assert sched.get_last_lr() == [sched.lr_at(step)]
        opt.step()
        sched.step()


def test_polynomial_decay_lr_and_tf_style():
    assert S.polynomial_decay_lr(5, 0.1, 10, 0.01, 0.5) == pytest.approx(0.09 * 0.5 ** 0.5 + 0.01)
    assert S.polynomial_decay_lr(50, 0.1, 10, 0.01) == pytest.approx(0.01)
    assert S.polynomial_decay_lr(3, 0.1, 0, 0.01) == 0.01
    with pytest.raises(ValueError):
        S.polynomial_decay_lr(3, 0.1, -1)
    opt = make_optimizer()
    sched = S.create_tf_style_schedule(opt, LR, 30, 5, min_lr_ratio=0.1, power=2.0)
    for step in range(35):
        want = S.tf_style_lr(step, init_lr=LR, num_train_steps=30, num_warmup_steps=5,
                             min_lr_ratio=0.1, power=2.0)
        assert sched.lr_at(step) == want
    assert sched.lr_at(5) == LR and sched.lr_at(30) == pytest.approx(LR * 0.1)
    assert S.warmup_then(1, initial_learning_rate=1.0, warmup_steps=2, decay_fn=abs) == 0.5


# --------------------------------------------------------------------------- names and errors


def test_scheduler_type_and_list():
    names = [t.value for t in S.SchedulerType]
    assert names == ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                     "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
                     "cosine_with_min_lr", "warmup_stable_decay"]
    listed = S.list_schedules()
    assert listed == sorted(listed) and set(names) | {"adafactor", "warmup"} == set(listed)
    assert S.get_scheduler(S.SchedulerType.COSINE, make_optimizer(), 1, 5).name == "cosine"
    assert "num_cycles" in S.scheduler_kwargs("cosine")
    assert str(S.SchedulerType.LINEAR) == "linear"


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="valid names: linear, cosine"):
        S.get_scheduler("cosin", make_optimizer(), 1, 10)


@pytest.mark.parametrize("name,w,t,needs", [
    ("linear", None, 10, "num_warmup_steps"),
    ("cosine", 1, None, "num_training_steps"),
    ("polynomial", None, None, "num_warmup_steps and num_training_steps"),
    ("inverse_sqrt", None, None, "num_warmup_steps"),
    ("constant_with_warmup", None, 10, "num_warmup_steps"),
    ("warmup_stable_decay", 1, 10, "num_decay_steps"),
])
def test_missing_steps(name, w, t, needs):
    with pytest.raises(ValueError, match=needs):
        S.get_scheduler(name, make_optimizer(), w, t)


def test_steps_optional_where_unused():
    S.get_scheduler("constant", make_optimizer())
    S.get_scheduler("reduce_lr_on_plateau", make_optimizer())
    S.get_scheduler("inverse_sqrt", make_optimizer(), 3)
    S.get_scheduler("warmup_stable_decay", make_optimizer(), 2, None,
                    {"num_decay_steps": 2, "num_stable_steps": 3})


@pytest.mark.parametrize("name,kw,bad", [
    ("linear", {"num_cycles": 2}, "num_cycles"),
    ("constant", {"lr_end": 0.1}, "lr_end"),
    ("cosine", {"power": 2}, "power"),
    ("reduce_lr_on_plateau", {"num_cycles": 1}, "num_cycles"),
    ("warmup_stable_decay", {"num_decay_steps": 2, "lr_end": 1}, "lr_end"),
])
def test_mismatched_kwargs_type_error(name, kw, bad):
    with pytest.raises(TypeError, match=bad):
        S.get_scheduler(name, make_optimizer(), 2, 10, kw)


@pytest.mark.parametrize("call", [
    lambda o: S.get_linear_schedule_with_warmup(o, -1, 10),
    lambda o: S.get_linear_schedule_with_warmup(o, 11, 10),
    lambda o: S.get_linear_schedule_with_warmup(o, 2.5, 10),
    lambda o: S.get_cosine_schedule_with_warmup(o, 2, 10, num_cycles=-1),
    lambda o: S.get_cosine_with_hard_restarts_schedule_with_warmup(o, 2, 10, num_cycles=0),
    lambda o: S.get_polynomial_decay_schedule_with_warmup(o, 2, 10, lr_end=LR),
    lambda o: S.get_polynomial_decay_schedule_with_warmup(o, 2, 10, lr_end=-1.0),
    lambda o: S.get_inverse_sqrt_schedule(o, 2, timescale=0),
    lambda o: S.get_cosine_with_min_lr_schedule_with_warmup(o, 2, 10),
    lambda o: S.get_cosine_with_min_lr_schedule_with_warmup(o, 2, 10, min_lr=0.01, min_lr_rate=0.1),
    lambda o: S.get_cosine_with_min_lr_schedule_with_warmup(o, 2, 10, min_lr_rate=1.5),
    lambda o: S.get_wsd_schedule(o, 2, 3),
    lambda o: S.get_wsd_schedule(o, 2, 3, 10, warmup_type="exp"),
    lambda o: S.get_wsd_schedule(o, 2, 3, 10, decay_type="step"),
    lambda o: S.get_wsd_schedule(o, 6, 6, 10),
    lambda o: S.get_wsd_schedule(o, 2, 3, 10, min_lr_ratio=2.0),
    lambda o: S.get_linear_schedule_with_warmup(o, 2, 10, last_epoch=-2),
    lambda o: S.get_linear_schedule_with_warmup(o, 2, 10, base_lrs=[1.0]),
    lambda o: S.get_linear_schedule_with_warmup(o, 2, 10).lr_at(-1),
    lambda o: S.get_reduce_on_plateau_schedule(o, factor=1.5),
    lambda o: S.get_reduce_on_plateau_schedule(o, mode="sideways"),
])
def test_bad_inputs_value_error(call):
    with pytest.raises(ValueError):
        call(make_optimizer())


@pytest.mark.parametrize("call", [
    lambda o: S.get_linear_schedule_with_warmup(o, "2", 10),
    lambda o: S.get_linear_schedule_with_warmup(o, True, 10),
    lambda o: S.get_linear_schedule_with_warmup(o, 2, 10, last_epoch=1.5),
    lambda o: S.get_linear_schedule_with_warmup([torch.zeros(1)], 2, 10),
    lambda o: S.WarmUp(o, 0.1, "not callable", 3),
    lambda o: S.LambdaSchedule(o, 3.0),
    lambda o: S.get_scheduler("reduce_lr_on_plateau", o, base_lrs=0.1),
])
def test_bad_inputs_type_error(call):
    with pytest.raises(TypeError):
        call(make_optimizer())


def test_integral_float_steps_accepted():
    s = S.get_linear_schedule_with_warmup(make_optimizer(), 2.0, 10.0)
    assert s.config == {"num_warmup_steps": 2, "num_training_steps": 10}


@pytest.mark.filterwarnings("ignore:linear. hyperparameters differ")
@pytest.mark.filterwarnings("ignore:loading the state of schedule")
def test_load_state_dict_checks():
    s = S.get_linear_schedule_with_warmup(make_optimizer(), 2, 10)
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"last_epoch": 3})
    other = S.get_cosine_schedule_with_warmup(make_optimizer(), 2, 20)
    with pytest.warns(UserWarning, match="'cosine' into 'linear'"):
        s.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="param groups"):
        s.load_state_dict(S.get_constant_schedule(make_optimizer(scales=(1.0,))).state_dict())


def test_wsd_both_lengths_warns_on_mismatch():
    with pytest.warns(UserWarning, match="num_stable_steps"):
        S.get_wsd_schedule(make_optimizer(), 2, 3, num_training_steps=100, num_stable_steps=4)


# --------------------------------------------------------------------------- Accelerate


def test_accelerate_helpers():
    assert S.accelerator_kwargs() == {"step_scheduler_with_optimizer": False}
    assert S.accelerator_kwargs(split_batches=True)["split_batches"] is True

    class Acc:
        sync_gradients = True
        optimizer_step_was_skipped = False

    opt = make_optimizer()
    sched = S.get_linear_schedule_with_warmup(opt, 2, 10)
    acc = Acc()
    acc.sync_gradients = False
    assert S.step_scheduler(sched, acc) is False and sched.last_epoch == 0
    acc.sync_gradients, acc.optimizer_step_was_skipped = True, True
    assert S.step_scheduler(sched, acc) is False and sched.last_epoch == 0
    acc.optimizer_step_was_skipped = False
    opt.step()
    assert S.step_scheduler(sched, acc) is True and sched.last_epoch == 1
    opt.step()
    assert S.step_scheduler(sched) is True and sched.last_epoch == 2


def test_under_accelerate_steps_count_optimizer_steps():
    accelerate = pytest.importorskip("accelerate")
    import inspect

    params = inspect.signature(accelerate.Accelerator.__init__).parameters
    assert set(S.accelerator_kwargs()) <= set(params)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2, **S.accelerator_kwargs())
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = S.get_linear_schedule_with_warmup(opt, 2, 10)
    model, opt, sched = acc.prepare(model, opt, sched)
    for _ in range(8):  # 8 micro-batches = 4 optimizer steps
        with acc.accumulate(model):
            model(torch.ones(4, 2)).sum().backward()
            opt.step()
            opt.zero_grad()
        S.step_scheduler(sched, acc)
    assert sched.scheduler.last_epoch == 4
    assert sched.get_last_lr()[0] == pytest.approx(LR * 6 / 8)


def test_adafactor_schedule_with_distopt_adafactor():
    optim = pytest.importorskip("distopt.optim")
    if not hasattr(optim, "Adafactor"):
        pytest.skip("distopt.optim.Adafactor not built yet")
    model = torch.nn.Linear(4, 3)
    opt = optim.Adafactor(model.parameters(), warmup_init=True, scale_parameter=False)
    sched = S.AdafactorSchedule(opt)
    for k in range(1, 4):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        assert sched.get_last_lr() == opt.relative_step_lrs()
        assert sched.get_last_lr()[0] == pytest.approx(sched.lr_at(k))


def test_reexported_from_compat_transformers():
    compat = pytest.importorskip("distopt.compat.transformers")
    for name in S.TRANSFORMERS_NAMES:
        assert getattr(compat, name) is getattr(S, name), name
