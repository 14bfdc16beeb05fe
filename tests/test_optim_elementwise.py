"""Element-wise optimizers: bad inputs, and what the shared optimizer table cannot cover
(AdamWeightDecay's name patterns, ``maximize``, Adahessian's randomness and refusals)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import distopt.optim as do
from distopt.optim._core import ShardSpec
from distopt.optim.radam import rectification
from tests import references_elementwise as R
from tests.problems import TinyMLP, make_params, quadratic_loss, regression_data, run_quadratic

ALL = [
    do.AdaBelief, do.RAdam, do.Nadam, do.RMSpropTF, do.MADGRAD, do.SGD, do.Adam, do.AdamWeightDecay,
    do.Adahessian, do.Adamax, do.Adagrad, do.Adadelta, do.RMSprop,
]  # fmt: skip
WITH_BETAS = [do.AdaBelief, do.RAdam, do.Nadam, do.Adam, do.AdamWeightDecay, do.Adahessian, do.Adamax]
WITH_EPS = [c for c in ALL if c is not do.SGD]


def _p():
    return [nn.Parameter(torch.randn(3, 2))]


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("lr", [-1e-3, math.nan, math.inf, "0.1"])
def test_bad_lr(cls, lr):
    with pytest.raises(ValueError):
        cls(_p(), lr=lr)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_unknown_kwarg_is_a_type_error(cls):
    with pytest.raises(TypeError):
        cls(_p(), lr=1e-3, no_such_option=1)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_negative_weight_decay(cls):
    with pytest.raises(ValueError):
        cls(_p(), weight_decay=-0.1)


@pytest.mark.parametrize("cls", WITH_EPS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("eps", [-1e-8, math.nan])
def test_bad_eps(cls, eps):
    with pytest.raises(ValueError):
        cls(_p(), eps=eps)


@pytest.mark.parametrize("cls", WITH_BETAS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.9), (0.9,), "ab"])
def test_bad_betas(cls, betas):
    with pytest.raises(ValueError):
        cls(_p(), betas=betas)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (do.AdaBelief, dict(weight_decay=1.0, fixed_decay=True)),
        (do.Nadam, dict(schedule_decay=-1e-3)),
        (do.RMSpropTF, dict(alpha=1.5)),
        (do.RMSpropTF, dict(alpha=-0.1)),
        (do.RMSpropTF, dict(momentum=-0.9)),
        (do.RMSpropTF, dict(lr=0.0, corrected_weight_decay=True)),
        (do.MADGRAD, dict(momentum=1.0)),
        (do.MADGRAD, dict(momentum=-0.1)),
        (do.SGD, dict(momentum=-0.1)),
        (do.SGD, dict(nesterov=True)),  # nesterov without momentum
        (do.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1)),
        (do.Adagrad, dict(lr_decay=-1.0)),
        (do.Adagrad, dict(initial_accumulator_value=-1.0)),
        (do.Adadelta, dict(rho=1.5)),
        (do.Adadelta, dict(rho=-0.5)),
        (do.RMSprop, dict(alpha=-0.5)),
        (do.RMSprop, dict(momentum=-0.5)),
        (do.Adahessian, dict(hessian_power=1.5)),
        (do.Adahessian, dict(hessian_power=-0.5)),
        (do.Adahessian, dict(update_each=0)),
        (do.Adahessian, dict(n_samples=0)),
        (do.Adahessian, dict(n_samples=1.5)),
        (do.Adahessian, dict(seed="x")),
        (do.AdamWeightDecay, dict(clipnorm=1.0, global_clipnorm=1.0)),
        (do.AdamWeightDecay, dict(clipnorm=0.0)),
        (do.AdamWeightDecay, dict(clipvalue=-1.0)),
        (do.AdamWeightDecay, dict(global_clipnorm=math.inf)),
        (do.AdamWeightDecay, dict(exclude_from_weight_decay=["("])),
    ],
    ids=lambda x: getattr(x, "__name__", None) or ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_bad_option(cls, kwargs):
    with pytest.raises(ValueError):
        cls(_p(), **kwargs)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_sparse_gradients_raise(cls):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# --------------------------------------------------------------------------- maximize


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (do.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.01)),
        (do.Adam, dict(lr=1e-2, weight_decay=0.01, amsgrad=True)),
        (do.Adamax, dict(lr=1e-2, weight_decay=0.01)),
        (do.Adagrad, dict(lr=1e-2, weight_decay=0.01)),
        (do.Adadelta, dict(lr=1.0, weight_decay=0.01)),
        (do.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=0.01)),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_maximize_matches_torch(cls, kwargs):
    """maximize=True ascends ``-loss`` exactly as descending ``loss`` does, and matches torch.optim."""
    p1, p2, p3 = make_params(), make_params(), make_params()
    o1 = cls(p1, maximize=True, **kwargs)
    o2 = cls(p2, **kwargs)
    o3 = getattr(torch.optim, cls.__name__)(p3, maximize=True, foreach=False, **kwargs)
    for t in range(6):
        for o, ps, sign in ((o1, p1, -1.0), (o2, p2, 1.0), (o3, p3, -1.0)):
            o.zero_grad()
            (sign * quadratic_loss(ps, t)).backward()
            o.step()
    for a, b, c in zip(p1, p2, p3):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- RAdam / AdaBelief


def test_rectification_threshold_and_formula():
    b1, b2 = 0.9, 0.999
    # rho_t is about t - 1 early on: the first five steps are not rectified
    assert all(rectification(b1, b2, float(t))[1] is None for t in range(1, 6))
    rho, step = rectification(b1, b2, 6.0)
    rho_inf = 2 / (1 - b2) - 1
    assert rho == pytest.approx(rho_inf - 12 * b2**6 / (1 - b2**6))
    r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    assert step == pytest.approx(r * math.sqrt(1 - b2**6) / (1 - b1**6), rel=1e-12)
    # large t: r -> 1, the step tends to Adam's
    assert rectification(b1, b2, 1e6)[1] == pytest.approx(1.0, rel=1e-3)


def test_adabelief_without_sgd_fallback_does_not_move_early():
    p = [nn.Parameter(torch.randn(4))]
    before = p[0].detach().clone()
    opt = do.AdaBelief(p, lr=0.1, degenerated_to_sgd=False)
    for _ in range(5):  # rho_t < 5 for t <= 5 with beta2 = 0.999
        opt.zero_grad()
        (p[0] ** 2).sum().backward()
        opt.step()
    assert torch.equal(p[0].detach(), before)


# --------------------------------------------------------------------------- AdamWeightDecay names


def _named_mlp():
    torch.manual_seed(0)
    return TinyMLP()


def _zero_grad_step(opt, params):
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()


def test_adamweightdecay_patterns_select_decayed_params():
    """With zero gradients Adam does not move, so only the decay shows: exactly the selected names."""
    model = _named_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = do.AdamWeightDecay(model, lr=0.1, weight_decay=0.5, include_in_weight_decay=[r"fc2\.bias"],
                             exclude_from_weight_decay=["bias", "norm"])
    _zero_grad_step(opt, list(model.parameters()))
    decayed = {"fc1.weight", "fc2.weight", "fc2.bias"}  # include beats exclude
    for n, p in model.named_parameters():
        want = before[n] * (1 - 0.1 * 0.5) if n in decayed else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7, msg=n)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("form", ["module", "named_parameters", "groups", "param_names"])
def test_adamweightdecay_names_matches_reference(form):
    model, ref_model = _named_mlp(), _named_mlp()
    kw = dict(lr=1e-2, weight_decay=0.1, exclude_from_weight_decay=["LayerNorm", "norm", "bias"])
    if form == "module":
        opt = do.AdamWeightDecay(model, **kw)
    elif form == "named_parameters":
        opt = do.AdamWeightDecay(model.named_parameters(), **kw)
    elif form == "groups":
        named = list(model.named_parameters())
        opt = do.AdamWeightDecay([{"params": named[:2]}, {"params": named[2:], "lr": 5e-3}], **kw)
    else:
        opt = do.AdamWeightDecay(model.parameters(), param_names=dict(model.named_parameters()), **kw)
    names = {id(p): n for n, p in ref_model.named_parameters()}
    if form == "groups":
        rp = list(ref_model.parameters())
        ref = R.RefAdamWeightDecay([{"params": rp[:2]}, {"params": rp[2:], "lr": 5e-3}], names=names, **kw)
    else:
        ref = R.RefAdamWeightDecay(ref_model.parameters(), names=names, **kw)
    x, y = regression_data()
    for m, o in ((model, opt), (ref_model, ref)):
        for _ in range(8):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=n)


def test_adamweightdecay_needs_names_for_patterns():
    model = _named_mlp()
    with pytest.raises(ValueError, match="names"):
        do.AdamWeightDecay(model.parameters(), weight_decay=0.1, exclude_from_weight_decay=["bias"])
    # a group added later without names is refused too (unless param_names knows its tensors)
    named = list(model.named_parameters())
    opt = do.AdamWeightDecay(named[:2], exclude_from_weight_decay=["bias"])
    with pytest.raises(ValueError, match="names"):
        opt.add_param_group({"params": [p for _, p in named[2:]]})
    opt = do.AdamWeightDecay([p for _, p in named[:2]], exclude_from_weight_decay=["bias"],
                             param_names=dict(named))
    opt.add_param_group({"params": [p for _, p in named[2:]]})
    assert opt.param_groups[1]["param_names"] == [n for n, _ in named[2:]]
    with pytest.raises(TypeError):
        do.AdamWeightDecay(model.parameters(), param_names=[("a", named[0][1])])
    with pytest.raises(ValueError):  # mixed named and unnamed entries
        do.AdamWeightDecay([named[0], named[1][1]])


def test_adamweightdecay_without_patterns_needs_no_names():
    params = make_params()
    opt = do.AdamWeightDecay(params, weight_decay=0.1)
    run_quadratic(opt, params, 2)
    assert "param_names" not in opt.param_groups[0]


def test_adamweightdecay_state_dict_keeps_names():
    model = _named_mlp()
    opt = do.AdamWeightDecay(model, lr=1e-2, weight_decay=0.1, exclude_from_weight_decay=["bias"])
    x, y = regression_data()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    assert sd["param_groups"][0]["param_names"][0] == "fc1.weight"
    opt2 = do.AdamWeightDecay(model, lr=1e-2, weight_decay=0.1, exclude_from_weight_decay=["bias"])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]


def test_adamweightdecay_global_clipnorm_spans_groups():
    p1, p2 = make_params(), make_params()
    kw = dict(lr=1e-2, weight_decay=0.05, global_clipnorm=2.0)
    opt = do.AdamWeightDecay([{"params": p1[:3]}, {"params": p1[3:], "lr": 5e-3}], **kw)
    ref = R.RefAdamWeightDecay([{"params": p2[:3]}, {"params": p2[3:], "lr": 5e-3}], **kw)
    run_quadratic(opt, p1, 6)
    run_quadratic(ref, p2, 6)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Adahessian


def _mlp_steps(opt, model, steps, start=0):
    x, y = regression_data()
    for _ in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward(create_graph=True)
        opt.step()


def test_adahessian_is_second_order_and_needs_create_graph():
    params = make_params()
    opt = do.Adahessian(params)
    assert opt.is_second_order
    quadratic_loss(params, 0).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()


def test_adahessian_refuses_sharded_params():
    params = make_params()
    opt = do.Adahessian(params)
    opt.set_sharding({params[0]: ShardSpec(torch.Size((14, 5)), 0, 7)})
    quadratic_loss(params, 0).backward(create_graph=True)
    with pytest.raises(NotImplementedError, match="model-level"):
        opt.step()


@pytest.mark.parametrize("update_each", [1, 2])
def test_adahessian_reproducible_and_bitwise_resume_with_random_draws(update_each):
    """On a model whose Hessian is not diagonal the estimate depends on the draws: a resumed run
    must still continue bit for bit, and two runs must agree."""
    kw = dict(lr=0.05, update_each=update_each, n_samples=2, weight_decay=1e-3)
    ref_model = _named_mlp()
    _mlp_steps(do.Adahessian(ref_model.parameters(), **kw), ref_model, 6)
    again = _named_mlp()
    _mlp_steps(do.Adahessian(again.parameters(), **kw), again, 6)
    model = _named_mlp()
    opt = do.Adahessian(model.parameters(), **kw)
    _mlp_steps(opt, model, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = copy.deepcopy(model)
    opt2 = do.Adahessian(resumed.parameters(), **kw)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    _mlp_steps(opt2, resumed, 3, start=3)
    for a, b, c in zip(ref_model.parameters(), again.parameters(), resumed.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_adahessian_seed_changes_draws():
    m1, m2 = _named_mlp(), _named_mlp()
    _mlp_steps(do.Adahessian(m1.parameters(), lr=0.05), m1, 2)
    _mlp_steps(do.Adahessian(m2.parameters(), lr=0.05, seed=7), m2, 2)
    assert any(not torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_adahessian_hutchinson_estimates_the_diagonal():
    """0.5 x^T H x with a dense H: the average of z * (H z) over many draws tends to diag(H)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    h = a @ a.t() + torch.eye(6)
    x = nn.Parameter(torch.randn(6, generator=g))
    opt = do.Adahessian([x], lr=0.0, update_each=2, n_samples=2000)
    (0.5 * x @ h @ x).backward(create_graph=True)
    opt.step()
    torch.testing.assert_close(opt.state[x]["hess"], torch.diagonal(h), rtol=0.15, atol=0.3)


def test_adahessian_avg_conv_kernel_averages_spatial_dims():
    w = nn.Parameter(torch.randn(2, 3, 3, 3))
    opt = do.Adahessian([w], lr=0.0, update_each=2, avg_conv_kernel=True)
    scale = torch.rand(2, 3, 3, 3) + 0.5
    (0.5 * scale * w * w).sum().backward(create_graph=True)
    opt.step()
    torch.testing.assert_close(opt.state[w]["hess"], scale.mean(dim=(2, 3), keepdim=True).expand_as(scale))


# --------------------------------------------------------------------------- misc


def test_sgd_without_momentum_keeps_no_state():
    params = make_params()
    opt = do.SGD(params, lr=1e-2)
    run_quadratic(opt, params, 2)
    assert all(len(opt.state[p]) == 0 for p in params)


def test_nadam_m_schedule_is_a_float_product():
    p = [nn.Parameter(torch.randn(3))]
    opt = do.Nadam(p, schedule_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        (p[0] ** 2).sum().backward()
        opt.step()
    want = math.prod(0.9 * (1 - 0.5 * 0.96 ** (t * 0.1)) for t in (1, 2, 3))
    assert isinstance(opt.state[p[0]]["m_schedule"], float)
    assert opt.state[p[0]]["m_schedule"] == pytest.approx(want, rel=1e-12)


def test_rmsproptf_square_avg_starts_at_one():
    p = [nn.Parameter(torch.zeros(3))]
    opt = do.RMSpropTF(p, alpha=0.9)
    p[0].grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(opt.state[p[0]]["square_avg"], torch.full((3,), 0.9))


def test_all_exported():
    for cls in ALL:
        assert cls.__name__ in do.__all__ and issubclass(cls, torch.optim.Optimizer)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_mixed_dtypes_take_the_foreach_path(decoupled):
    """fp32 and fp64 parameters together cannot use the fused kernel: same numbers either way."""
    def params():
        g = torch.Generator().manual_seed(0)
        return [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(4, generator=g).double())]

    kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=True, decoupled_weight_decay=decoupled)
    p1, p2 = params(), params()
    o1 = do.Adam(p1, **kw)
    o2 = torch.optim.Adam(p2, foreach=False, **kw)
    for t in range(5):
        for o, ps in ((o1, p1), (o2, p2)):
            o.zero_grad()
            sum(((i + 1.5) * p.double() ** 2 + t * p.double()).sum() for i, p in enumerate(ps)).backward()
            o.step()
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
