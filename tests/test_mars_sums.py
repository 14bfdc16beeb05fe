"""Mars's sums pass (distopt/optim/mars.py ``_interleaved_squares``): inside a compiled kernel
the squares of a flat ``c`` are added in ``split`` interleaved parts, the remainder from a
masked window; their sum is ``||c||^2`` for every length, from one graph (no graph per
remainder)."""

from __future__ import annotations

import torch

from distopt.optim.mars import _interleaved_squares


class _Counting:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _total(c: torch.Tensor, split: int) -> torch.Tensor:
    return _interleaved_squares(c, split).sum(dtype=torch.float64)


def test_interleaved_squares_sum_to_the_squared_norm_for_every_remainder():
    backend = _Counting()
    fn = torch.compile(_total, backend=backend, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for n in (4000, 4001, 4002, 4003, 4004, 517):
        c = torch.randn(n, generator=gen)
        expected = (c * c).double().sum()  # float32 squares, float64 sum (the kernel's maths)
        parts = torch.compile(_interleaved_squares, backend="eager", dynamic=True)(c, 4)
        assert parts.shape == (n // 4,)  # 4 places read at once
        got = fn(c, 4)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0, msg=f"n={n}")
        # the remainder counts: the 4 parts alone miss up to 3 squares
        q = n // 4
        alone = sum((c[i * q : (i + 1) * q] ** 2).double().sum() for i in range(4))
        assert n % 4 == 0 or not torch.allclose(alone, expected, rtol=1e-12, atol=0)
    assert backend.graphs == 1, f"{backend.graphs} graphs: a length compiled again"


def test_interleaved_squares_eagerly_and_on_rows_are_the_plain_squares():
    c = torch.randn(4001)
    assert torch.equal(_interleaved_squares(c, 4), c * c)  # eager: as before, no reordering
    rows = torch.randn(3, 50)  # small tensors stacked one per row: per-row sums
    got = torch.compile(_interleaved_squares, backend="eager", dynamic=True)(rows, 4)
    assert torch.equal(got, rows * rows)
