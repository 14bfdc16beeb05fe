"""The trust-ratio rules' kernel shapes (distopt/optim/_rule_trust.py, lamb.py, lars.py).

What the graphs handed to ``torch.compile``'s backend contain, seen with a backend that runs
them as traced (no C++ build): Lamb's fused sums+update kernel computes ``sqrt(v)`` once per
element (its update takes m, v and u from the sums phase), and per-tensor factors pass through
``once`` (a reduction, computed once per call).  Numbers against eager: tests/test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

import distopt.optim as do
from distopt.optim import _kernel as K
from distopt.optim._rule_trust import once


class _Graphs:
    """A ``torch.compile`` backend that keeps every captured graph and runs it as traced."""

    def __init__(self):
        self.gms = []

    def __call__(self, gm, example_inputs):
        self.gms.append(gm)
        return gm.forward


def _calls(gm, name: str, min_dim: int) -> int:
    """Nodes of ``gm`` calling ``name`` (function or method) whose result has >= ``min_dim`` dims."""
    count = 0
    for node in gm.graph.nodes:
        target = getattr(node.target, "__name__", node.target)
        if node.op in ("call_function", "call_method") and target == name:
            val = node.meta.get("example_value")
            if isinstance(val, torch.Tensor) and val.dim() >= min_dim:
                count += 1
    return count


@pytest.fixture
def graphs(monkeypatch):
    backend = _Graphs()
    monkeypatch.setattr(K, "BACKEND", backend)
    monkeypatch.setattr(K, "_kernels", {})
    monkeypatch.setattr(K, "_failed", set())
    K.set_mode("compile")
    yield backend
    K.set_mode(None)


def _step(make, steps: int = 2):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40000))  # one large tensor: one fused kernel call
    opt = make([p])
    for _ in range(steps):
        p.grad = torch.randn(p.shape)
        opt.step()
    return p


@pytest.mark.skipif(not K._can_compile(torch.device("cpu")), reason="no C++ compiler")
def test_lamb_fused_kernel_computes_its_direction_once(graphs):
    p = _step(lambda ps: do.Lamb(ps, weight_decay=0.01))
    assert len(graphs.gms) == 1, "one fused sums+update graph for one large tensor"
    gm = graphs.gms[0]
    # one element-wise sqrt(v) and one division by it; the sums phase's u feeds the update
    assert _calls(gm, "sqrt", 1) == 1, gm.code
    assert _calls(gm, "truediv", 1) + _calls(gm, "div", 1) == 1, gm.code
    # the trust ratio goes through once(): a 16-wide max over its copies
    assert _calls(gm, "amax", 0) == 1, gm.code
    assert torch.isfinite(p).all()


@pytest.mark.skipif(not K._can_compile(torch.device("cpu")), reason="no C++ compiler")
def test_lars_trust_factor_goes_through_once(graphs):
    _step(lambda ps: do.Lars(ps, weight_decay=0.01, momentum=0.9))
    assert len(graphs.gms) == 1
    assert _calls(graphs.gms[0], "amax", 0) == 1, graphs.gms[0].code


@pytest.mark.parametrize("shape", [(), (5, 1)])
def test_once_is_the_value(shape):
    x = torch.randn(shape, dtype=torch.float64)
    y = once(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, x)
    nan = once(torch.tensor(float("nan")))
    assert torch.isnan(nan)
