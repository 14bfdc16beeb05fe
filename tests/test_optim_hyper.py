"""The hyperparameter spec: constructor, validation and defaults all come from ``hypers``."""

from __future__ import annotations

import inspect

import pytest
import torch

import distopt.optim as do
from distopt.optim._core import DistOptimizer
from distopt.optim._hyper import KW_ONLY, REQUIRED, HyperSpec, betas, flag, integer, lr, nonneg

P = inspect.Parameter


class _Toy(DistOptimizer):
    hypers = HyperSpec(
        lr(REQUIRED),
        betas((0.5, 0.6)),
        nonneg("momentum", 0.9, below=1.0),
        integer("every", 2, minimum=1),
        KW_ONLY,
        flag("maximize", False),
    )

    def _configure(self, params, hypers):
        if hypers["maximize"] and hypers["momentum"] == 0.0:
            raise ValueError("maximize needs a momentum here")
        return params, {**hypers, "derived": hypers["every"] * 2}


def _p():
    return [torch.nn.Parameter(torch.zeros(2))]


def test_signature_comes_from_the_spec():
    sig = inspect.signature(_Toy)
    got = [(n, p.kind, p.default, p.annotation) for n, p in sig.parameters.items()]
    assert got == [
        ("params", P.POSITIONAL_OR_KEYWORD, P.empty, "Iterable"),
        ("lr", P.POSITIONAL_OR_KEYWORD, P.empty, "float"),
        ("betas", P.POSITIONAL_OR_KEYWORD, (0.5, 0.6), "tuple[float, float]"),
        ("momentum", P.POSITIONAL_OR_KEYWORD, 0.9, "float"),
        ("every", P.POSITIONAL_OR_KEYWORD, 2, "int"),
        ("maximize", P.KEYWORD_ONLY, False, "bool"),
    ]


def test_defaults_come_from_the_spec_and_configure():
    opt = _Toy(_p(), 0.1, [0.1, 0.2], every=3)
    assert opt.defaults == dict(lr=0.1, betas=(0.1, 0.2), momentum=0.9, every=3, maximize=False, derived=6)
    assert opt.param_groups[0]["betas"] == (0.1, 0.2)  # a list is stored as a tuple


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((), {}, TypeError, "lr"),  # required
        ((0.1,), {"bogus": 1}, TypeError, "bogus"),
        ((0.1, (0.9, 0.9), 0.9, 2, True), {}, TypeError, "positional"),  # maximize is keyword-only
        ((-1.0,), {}, ValueError, "lr"),
        ((0.1,), {"betas": (0.9, 1.0)}, ValueError, "beta"),
        ((0.1,), {"momentum": 1.0}, ValueError, r"momentum.*\[0, 1\)"),
        ((0.1,), {"every": 0}, ValueError, "every"),
        ((0.1,), {"every": True}, ValueError, "every"),
        ((0.1,), {"momentum": 0.0, "maximize": True}, ValueError, "maximize"),
    ],
)
def test_bad_arguments_raise(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _Toy(_p(), *args, **kwargs)


def test_a_class_cannot_have_both_a_spec_and_its_own_init():
    with pytest.raises(TypeError, match="hypers"):

        class _Both(DistOptimizer):
            hypers = HyperSpec(lr(1e-3))

            def __init__(self, params):  # pragma: no cover - never called
                super().__init__(params, {})


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="twice"):
        HyperSpec(lr(1e-3), nonneg("lr", 0.0))


_DECLARED = [c for c in vars(do).values() if isinstance(c, type) and vars(c).get("hypers")]


def test_every_distopt_optimizer_declares_its_hyperparameters():
    assert {c.__name__ for c in _DECLARED} >= {
        "AdaBelief", "Adadelta", "Adafactor", "AdafactorTimm", "Adagrad", "Adahessian", "Adam",
        "AdamW", "AdamWeightDecay", "Adamax", "AdamP", "Lamb", "Lars", "MADGRAD", "Nadam",
        "NvNovoGrad", "RAdam", "RMSprop", "RMSpropTF", "SGD", "SGDP",
    }  # fmt: skip


@pytest.mark.parametrize("cls", _DECLARED, ids=lambda c: c.__name__)
def test_signature_and_defaults_are_the_spec(cls):
    assert list(inspect.signature(cls).parameters)[1:] == list(cls.hypers.names)
    kwargs = {"lr": 0.1} if cls.hypers.entries[0].default is REQUIRED else {}
    opt = cls(_p(), **kwargs)
    if cls._configure is DistOptimizer._configure:  # no hook: the defaults are the spec's
        assert list(opt.defaults) == list(cls.hypers.names)
        for h in cls.hypers:
            if h.name not in kwargs:
                assert opt.defaults[h.name] == h.validate(h.default), h.name
    else:  # the hook may drop constructor-only entries and derive others
        derived = set(opt.defaults) - set(cls.hypers.names)
        # schedule-free keeps the reference's bookkeeping (k, lr_max, weight_sum, ...) per group
        from distopt.optim.schedule_free import _BOOKKEEPING

        assert derived <= {"max_lr_snapshot", "relative_step", "beta1", *_BOOKKEEPING}, derived
