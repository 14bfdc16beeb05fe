"""distopt.compat.transformers.GradientAccumulator: the TensorFlow-side utility in PyTorch form.

Behaviour checked against transformers' documented TF semantics (the class left transformers
in v5): accumulation on call, ``step`` counting calls, ``gradients`` before the first call and
mismatched lengths raising ``ValueError``, ``reset`` zeroing, ``None`` entries kept.
"""

from __future__ import annotations

import pytest
import torch

from distopt.compat import transformers as optimization
from distopt.compat._tf_accumulator import GradientAccumulator


def test_exported_from_the_transformers_facade():
    assert optimization.GradientAccumulator is GradientAccumulator
    assert "GradientAccumulator" in optimization.__all__


def test_accumulates_counts_and_resets():
    acc = GradientAccumulator()
    assert int(acc.step) == 0
    assert acc.step.dtype == torch.int64 and acc.step.dim() == 0
    with pytest.raises(ValueError, match="called first"):
        _ = acc.gradients
    acc([torch.tensor([1.0, 2.0]), torch.tensor([-2.0, 1.0])])
    acc([torch.tensor([-1.0, 2.0]), torch.tensor([-1.0, 2.0])])
    acc([torch.tensor([-1.0, -1.0]), torch.tensor([2.0, 3.0])])
    assert int(acc.step) == 3
    g = acc.gradients
    assert len(g) == 2
    torch.testing.assert_close(g[0], torch.tensor([-1.0, 3.0]))
    torch.testing.assert_close(g[1], torch.tensor([-1.0, 6.0]))
    with pytest.raises(ValueError, match="Expected 2 gradients, but got 1"):
        acc([torch.tensor([1.0, 2.0])])
    assert int(acc.step) == 3  # a rejected call does not count
    acc.reset()
    assert int(acc.step) == 0
    torch.testing.assert_close(acc.gradients[0], torch.zeros(2))
    torch.testing.assert_close(acc.gradients[1], torch.zeros(2))
    acc([torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])])
    assert int(acc.step) == 1
    torch.testing.assert_close(acc.gradients[1], torch.tensor([0.5, 0.5]))


def test_gradients_are_copies():
    acc = GradientAccumulator()
    acc([torch.ones(3)])
    acc.gradients[0].mul_(100.0)  # scaling what was returned does not touch the accumulator
    torch.testing.assert_close(acc.gradients[0], torch.ones(3))


def test_none_entries():
    acc = GradientAccumulator()
    acc([None, torch.ones(2)])
    acc([torch.ones(1), torch.ones(2)])  # a buffer was never created for entry 0: skipped
    acc([torch.ones(1), None])
    g = acc.gradients
    assert g[0] is None
    torch.testing.assert_close(g[1], torch.full((2,), 2.0))
    assert int(acc.step) == 3


def test_reset_before_first_call_and_shapes_dtypes_kept():
    acc = GradientAccumulator()
    acc.reset()  # nothing to do
    assert int(acc.step) == 0
    acc(torch.ones(2, 3, dtype=torch.float64) for _ in range(2))  # any iterable
    g = acc.gradients
    assert g[0].shape == (2, 3) and g[0].dtype == torch.float64


def test_with_autograd_grads_matches_sum_of_losses():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    params = list(model.parameters())
    xs = [torch.randn(3, 4) for _ in range(3)]
    acc = GradientAccumulator()
    for x in xs:
        acc(torch.autograd.grad(model(x).pow(2).sum(), params))
    model.zero_grad()
    sum(model(x).pow(2).sum() for x in xs).backward()
    for p, g in zip(params, acc.gradients):
        torch.testing.assert_close(g, p.grad)


def test_bad_entries():
    acc = GradientAccumulator()
    with pytest.raises(TypeError):
        acc([1.0])
