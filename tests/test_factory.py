"""The optimizer factory: names, timm's per-name defaults, param groups, layer decay, registry."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from torch import nn

import distopt.optim as do
from distopt.optim import _factory
from distopt.optim._param_groups import layer_ids, param_groups_layer_decay

# name -> (distopt class name, group entries timm's factory implies for that name)
EXPECTED = {
    "sgd": ("SGD", {"nesterov": True, "momentum": 0.9}),
    "nesterov": ("SGD", {"nesterov": True, "momentum": 0.9}),
    "momentum": ("SGD", {"nesterov": False, "momentum": 0.9}),
    "sgdp": ("SGDP", {"nesterov": True, "momentum": 0.9}),
    "adam": ("Adam", {}),
    "adamw": ("AdamW", {}),
    "nadam": ("Nadam", {}),
    "radam": ("RAdam", {}),
    "adamax": ("Adamax", {}),
    "adamp": ("AdamP", {"wd_ratio": 0.01, "nesterov": True}),
    "adabelief": ("AdaBelief", {"rectify": False}),
    "radabelief": ("AdaBelief", {"rectify": True}),
    "adafactor": ("AdafactorTimm", {}),
    "adahessian": ("Adahessian", {}),
    "lamb": ("Lamb", {}),
    "lambc": ("Lamb", {"trust_clip": True}),
    "lambw": ("Lamb", {"decoupled_decay": True}),
    "lambcw": ("Lamb", {"trust_clip": True, "decoupled_decay": True}),
    "lars": ("Lars", {"momentum": 0.9}),
    "larc": ("Lars", {"trust_clip": True}),
    "nlars": ("Lars", {"nesterov": True}),
    "nlarc": ("Lars", {"nesterov": True, "trust_clip": True}),
    "madgrad": ("MADGRAD", {"momentum": 0.9}),
    "madgradw": ("MADGRAD", {"decoupled_decay": True}),
    "novograd": ("NvNovoGrad", {}),
    "nvnovograd": ("NvNovoGrad", {}),
    "novogradw": ("NvNovoGrad", {"decoupled_decay": True}),
    "rmsprop": ("RMSprop", {"alpha": 0.9, "momentum": 0.9}),
    "rmsproptf": ("RMSpropTF", {"alpha": 0.9, "momentum": 0.9}),
    "rmsproptfw": ("RMSpropTF", {"alpha": 0.9, "decoupled_decay": True}),
    "adagrad": ("Adagrad", {"eps": 1e-8}),
    "adadelta": ("Adadelta", {}),
    "adamweightdecay": ("AdamWeightDecay", {}),
}


def _need(cls_name):
    if not hasattr(do, cls_name):
        pytest.skip(f"distopt.optim.{cls_name} has not landed yet")
    return getattr(do, cls_name)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class MiniViT(nn.Module):
    """Stem, three numbered blocks, final norm and head (timm's ViT layout, tiny)."""

    def __init__(self, d=8, depth=3, matcher=False):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, d))
        self.patch_embed = nn.Linear(6, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)
        self._matcher = matcher

    def forward(self, x):
        h = self.patch_embed(x) + self.pos_embed
        return self.head(self.norm(self.blocks(h)).mean(1))

    def no_weight_decay(self):
        return {"pos_embed"}


class MatcherViT(MiniViT):
    def group_matcher(self, coarse=False):
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, 6, generator=g), torch.randn(5, 3, generator=g)


def _train_step(opt, model):
    x, y = _batch()
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward(create_graph=getattr(opt, "is_second_order", False)
                  or type(getattr(opt, "base_optimizer", opt)).__name__ == "Adahessian")
    opt.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- names and defaults


def test_every_timm_name_is_registered():
    assert set(EXPECTED) <= set(_factory.default_registry._specs)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_name_maps_to_class_with_timm_defaults(name):
    cls_name, entries = EXPECTED[name]
    cls = _need(cls_name)
    torch.manual_seed(0)
    model = MiniViT()
    lr = 1.0 if name == "adafactor" else 1e-2
    opt = do.create_optimizer_v2(model, name, lr=lr, weight_decay=0.01)
    assert type(opt) is cls
    for group in opt.param_groups:
        for key, value in entries.items():
            assert group[key] == value, (name, key, group[key])
    before = [p.detach().clone() for p in model.parameters()]
    _train_step(opt, model)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert name in do.list_optimizers()


@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd", "adafactor", "lars"])
def test_lookahead_prefix(name):
    _need(EXPECTED[name][0])
    model = MiniViT()
    opt = do.create_optimizer_v2(model, f"lookahead_{name}", lr=1e-2, weight_decay=0.01,
                                 lookahead_k=2, lookahead_alpha=0.3)
    assert isinstance(opt, do.Lookahead)
    assert type(opt.base_optimizer).__name__ == EXPECTED[name][0]
    assert all(g["lookahead_k"] == 2 and g["lookahead_alpha"] == 0.3 for g in opt.param_groups)
    for _ in range(2):
        _train_step(opt, model)
    assert any("lookahead_slow_buff" in s for s in opt.state.values())


def test_default_is_nesterov_sgd():
    _need("SGD")
    opt = do.create_optimizer_v2(MiniViT(), lr=0.1)
    assert type(opt).__name__ == "SGD"
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        do.create_optimizer_v2(MiniViT(), "adamz")
    assert "adamw" in str(exc.value) and "lamb" in str(exc.value)
    with pytest.raises(ValueError):
        do.get_optimizer_class("nope")


def test_unknown_kwargs_raise_type_error_naming_them():
    with pytest.raises(TypeError, match="bogus.*other|other.*bogus"):
        do.create_optimizer_v2(MiniViT(), "adamw", lr=1e-3, bogus=1, other=2)
    with pytest.raises(TypeError, match="lookahead_k"):
        do.create_optimizer_v2(MiniViT(), "adamw", lookahead_k=3)


def test_eps_and_betas_dropped_for_classes_without_them():
    # timm's factory drops these "common" arguments for optimizers that lack them
    @do.register_optimizer("_plain_test_opt", has_momentum=False)
    class Plain(torch.optim.SGD):
        def __init__(self, params, lr=0.1, weight_decay=0.0):
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    try:
        opt = do.create_optimizer_v2(MiniViT(), "_plain_test_opt", eps=1e-3, betas=(0.9, 0.99))
        assert type(opt) is Plain
    finally:
        _factory.default_registry._specs.pop("_plain_test_opt")


def test_foreach_is_accepted(caplog):
    with caplog.at_level(logging.DEBUG, logger="distopt.optim._factory"):
        opt = do.create_optimizer_v2(MiniViT(), "adamw", lr=1e-3, foreach=False)
    assert isinstance(opt, do.AdamW)
    assert "foreach" in caplog.text
    # honoured by classes that take it
    do.register_optimizer("_torch_adamw_test", torch.optim.AdamW)
    try:
        opt = do.create_optimizer_v2(MiniViT(), "_torch_adamw_test", lr=1e-3, foreach=False)
        assert opt.param_groups[0]["foreach"] is False
    finally:
        _factory.default_registry._specs.pop("_torch_adamw_test")


# --------------------------------------------------------------------------- weight decay groups


def _decay_of(opt, model):
    out = {}
    ids = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            out[ids[id(p)]] = g["weight_decay"]
    return out


def test_no_decay_on_bias_norm_1d_and_no_weight_decay_names():
    model = MiniViT()
    wd = _decay_of(do.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05), model)
    assert wd["patch_embed.weight"] == 0.05 and wd["blocks.0.fc.weight"] == 0.05
    assert wd["head.weight"] == 0.05
    for name in ("patch_embed.bias", "blocks.1.norm.weight", "blocks.1.norm.bias", "head.bias",
                 "pos_embed"):  # pos_embed: model.no_weight_decay()
        assert wd[name] == 0.0, name
    wd = _decay_of(do.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05,
                                          filter_bias_and_bn=False), model)
    assert wd["head.bias"] == 0.05 and wd["pos_embed"] == 0.0
    opt = do.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.0)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.0


def test_params_are_passed_through():
    model = MiniViT()
    opt = do.create_optimizer_v2(model.parameters(), "adamw", lr=1e-3, weight_decay=0.05)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.05
    groups = [{"params": [model.head.weight], "lr": 0.5}, {"params": [model.head.bias]}]
    opt = do.create_optimizer_v2(groups, "adamw", lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-3]


def test_param_group_fn_overrides():
    model = MiniViT()

    def fn(m):
        return [{"params": m.head.parameters(), "lr": 0.1}, {"params": m.blocks.parameters()}]

    opt = do.create_optimizer_v2(model, "adamw", lr=1e-3, param_group_fn=fn)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1e-3]


# --------------------------------------------------------------------------- layer decay


def test_layer_ids_by_rule_and_by_group_matcher():
    ids = layer_ids(MiniViT())
    assert ids["pos_embed"] == 0 and ids["patch_embed.weight"] == 0
    assert [ids[f"blocks.{i}.fc.weight"] for i in range(3)] == [1, 2, 3]
    assert ids["norm.weight"] == 4 and ids["head.bias"] == 4
    ids = layer_ids(MatcherViT())
    assert ids["pos_embed"] == 0 and ids["blocks.2.norm.bias"] == 3
    assert ids["norm.weight"] == 3  # (99999,) suffix: merged into the previous layer
    assert ids["head.weight"] == 4  # unmatched: last
    flat = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert layer_ids(nn.ModuleDict({"a": flat[0], "b": flat[1]})) == {
        "a.weight": 0, "a.bias": 0, "b.weight": 1, "b.bias": 1}


def _lr_by_name(opt, model):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("wrap", ["", "lookahead_"])
def test_layer_decay_sets_group_lrs_and_survives_lambdalr(wrap):
    model = MiniViT()
    opt = do.create_optimizer_v2(model, wrap + "adamw", lr=1e-2, weight_decay=0.05, layer_decay=0.5)
    lrs = _lr_by_name(opt, model)
    assert lrs["head.weight"] == pytest.approx(1e-2)
    assert lrs["blocks.2.fc.weight"] == pytest.approx(1e-2 * 0.5)
    assert lrs["blocks.0.fc.weight"] == pytest.approx(1e-2 * 0.5**3)
    assert lrs["pos_embed"] == pytest.approx(1e-2 * 0.5**4)
    for g in opt.param_groups:
        assert g["initial_lr"] == pytest.approx(g["lr"]) and "lr_scale" in g
        assert g["lr"] == pytest.approx(1e-2 * g["lr_scale"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1 * (step + 1))
    for _ in range(3):
        _train_step(opt, model)
        sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-2 * g["lr_scale"] * 0.4)


def test_layer_decay_survives_distopt_schedules():
    schedules = pytest.importorskip("distopt.schedules")
    get_scheduler = getattr(schedules, "get_scheduler", None)
    if get_scheduler is None:
        pytest.skip("distopt.schedules.get_scheduler has not landed yet")
    model = MiniViT()
    opt = do.create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05, layer_decay=0.5)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10)
    for step in range(1, 5):
        _train_step(opt, model)
        sched.step()
        factor = min(step / 2, (10 - step) / 8)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(1e-2 * g["lr_scale"] * factor)


def test_layer_decay_min_scale_and_no_opt_scale():
    model = MiniViT()
    groups = param_groups_layer_decay(model, layer_decay=0.5, min_scale=0.2)
    assert min(g["lr_scale"] for g in groups) == 0.2
    model = MiniViT()
    opt = do.create_optimizer_v2(model, "adamw", lr=1e-2, layer_decay=0.5, layer_decay_no_opt_scale=0.2)
    assert not model.pos_embed.requires_grad and not model.blocks[0].fc.weight.requires_grad
    assert model.blocks[1].fc.weight.requires_grad
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])


def test_layer_decay_with_lr_none_keeps_default(caplog):
    _need("AdafactorTimm")
    model = MiniViT()
    opt = do.create_optimizer_v2(model, "adafactor", layer_decay=0.5)
    assert "lr_scale" in caplog.text
    _train_step(opt, model)


# --------------------------------------------------------------------------- registry


def test_register_optimizer_function_and_decorator():
    do.register_optimizer("_heavyball_test", torch.optim.SGD, defaults={"nesterov": False},
                          description="test entry")

    @do.register_optimizer("_deco_test", defaults={"momentum": 0.5}, description="decorated")
    class Deco(torch.optim.SGD):
        pass

    try:
        assert "_heavyball_test" in do.list_optimizers("_*")
        assert ("_deco_test", "decorated") in do.list_optimizers("_deco*", with_description=True)
        opt = do.create_optimizer_v2(MiniViT(), "_deco_test", lr=0.1)
        assert type(opt) is Deco and opt.param_groups[0]["momentum"] == 0.5
        opt = do.create_optimizer_v2(MiniViT(), "lookahead__heavyball_test", lr=0.1)
        assert isinstance(opt, do.Lookahead) and opt.param_groups[0]["momentum"] == 0.9
        partial = do.get_optimizer_class("_heavyball_test")
        assert partial.keywords == {"nesterov": False}
        assert do.get_optimizer_class("_heavyball_test", bind_defaults=False) is torch.optim.SGD
    finally:
        _factory.default_registry._specs.pop("_heavyball_test")
        _factory.default_registry._specs.pop("_deco_test")


def test_list_optimizers_filters():
    names = do.list_optimizers()
    assert names == sorted(names) and "adamw" in names and "lamb" in names
    assert do.list_optimizers("lamb*") == [n for n in names if n.startswith("lamb")]
    assert "lambc" not in do.list_optimizers("lamb*", exclude_filters=["*c*"])
    assert do.list_optimizers(["lamb", "adamw"]) == ["adamw", "lamb"]
    desc = dict(do.list_optimizers(with_description=True))
    assert desc["adamw"]


def test_legacy_create_optimizer_from_args():
    args = argparse.Namespace(opt="lookahead_adamw", lr=2e-3, weight_decay=0.05, momentum=0.9,
                              opt_eps=1e-7, opt_betas=(0.8, 0.9), layer_decay=None,
                              opt_args={"amsgrad": True})
    model = MiniViT()
    opt = do.create_optimizer(args, model)
    assert isinstance(opt, do.Lookahead)
    g = opt.param_groups[-1]
    assert (g["lr"], g["eps"], g["betas"], g["amsgrad"]) == (2e-3, 1e-7, (0.8, 0.9), True)
    _train_step(opt, model)
