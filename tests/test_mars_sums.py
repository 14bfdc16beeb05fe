"""Mars's sums pass (distopt/optim/mars.py ``_interleaved_squares``): inside a compiled kernel
the squares of a flat ``c`` are added in ``split`` interleaved parts plus the remainder; their
sums are ``||c||^2`` for every length, from one graph (no graph per remainder)."""

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
    parts = _interleaved_squares(c, split)
    return parts["c_sq"].sum(dtype=torch.float64) + parts["c_sq_rest"].sum(dtype=torch.float64)


def test_interleaved_squares_sum_to_the_squared_norm_for_every_remainder():
    backend = _Counting()
    fn = torch.compile(_total, backend=backend, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for n in (4000, 4001, 4002, 4003, 4004, 517):
        c = torch.randn(n, generator=gen)
        expected = (c * c).double().sum()  # float32 squares, float64 sum (the kernel's maths)
        parts = torch.compile(_interleaved_squares, backend="eager", dynamic=True)(c, 4)
        assert parts["c_sq"].shape == (n // 4,) and parts["c_sq_rest"].shape == (4,)
        got = fn(c, 4)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0, msg=f"n={n}")
        # the remainder counts: dropping it would miss up to 3 squares
        assert n % 4 == 0 or not torch.allclose(
            parts["c_sq"].sum(dtype=torch.float64), expected, rtol=1e-12, atol=0
        )
    assert backend.graphs == 1, f"{backend.graphs} graphs: a length compiled again"


def test_interleaved_squares_eagerly_and_on_rows_are_the_plain_squares():
    c = torch.randn(4001)
    parts = _interleaved_squares(c, 4)  # eager: as before, no reordering
    assert torch.equal(parts["c_sq"], c * c) and parts["c_sq_rest"].numel() == 0
    rows = torch.randn(3, 50)  # small tensors stacked one per row: per-row sums
    parts = torch.compile(_interleaved_squares, backend="eager", dynamic=True)(rows, 4)
    assert torch.equal(parts["c_sq"], rows * rows) and parts["c_sq_rest"].shape == (3, 0)
