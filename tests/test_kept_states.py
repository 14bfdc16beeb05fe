"""Small tensors' states kept as views of the runner's concatenation buffers (``_kernel_plan._Concat``).

In compiled mode the runner concatenates a group's small tensors into buffers kept across
steps; their state tensors become views of those buffers, so nothing is copied for the states
before or after the kernel.  These tests check every way a state can change outside the step:
written in place (even through ``.data`` or NumPy, which bump no version counter), replaced by
``load_state_dict`` (a save and load, bit for bit against an uninterrupted run), and that a
column of mixed dtypes keeps its tensors.  The kernels run through a counting backend (the
graph as captured, no C++ build), as in tests/test_kernels.py.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import distopt.optim as do
from distopt.optim import _kernel as K
from distopt.optim import _kernel_plan as P

SHAPES = [(5, 3), (15,), (4,), (2, 2, 3), (7,)]


class _Backend:
    """A ``torch.compile`` backend that runs the captured graph as it is."""

    def __call__(self, gm, example_inputs):
        return gm.forward


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setattr(K, "BACKEND", _Backend())
    monkeypatch.setattr(K, "_kernels", {})
    monkeypatch.setattr(K, "_failed", set())
    monkeypatch.setattr(P, "_rows", {})

    def set_mode(mode: str) -> None:
        K.set_mode(mode)

    yield set_mode
    K.set_mode(None)


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _state(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [t.detach().clone() for p in params for t in (p, *opt.state[p].values())]


def test_states_are_views_of_the_buffers_and_in_place_writes_count(compiled):
    """After a compiled step each state column is one buffer's views; writes into a state in
    place between steps (copy_, through .data, through NumPy) are what the next step reads:
    the same numbers as eager with the same writes."""
    out = {}
    for mode in ("eager", "compile"):
        compiled(mode)
        params = _params()
        opt = do.Adan(params, lr=1e-2, weight_decay=0.05)
        for step in range(5):
            _grads(params, step)
            opt.step()
            if step == 1:
                opt.state[params[0]]["exp_avg"].copy_(torch.full(SHAPES[0], 0.5))
                opt.state[params[1]]["exp_avg_sq"].data.fill_(2.0)
                opt.state[params[3]]["exp_avg_diff"].numpy()[...] = -1.0
        out[mode] = _state(opt, params)
        if mode == "compile":
            for name in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                col = [opt.state[p][name] for p in params]
                base = col[0]._base
                assert base is not None and all(t._base is base for t in col), name
                assert [t.shape for t in col] == [p.shape for p in params]
    for a, b in zip(out["eager"], out["compile"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_save_load_resumes_exactly(compiled):
    """Saved after 3 compiled steps (torch.save: each buffer once), loaded into another
    optimizer that has its own kept buffers, 3 more steps: bit for bit the uninterrupted run
    (fails if the loaded states were not taken: the old buffers' values would be used)."""
    compiled("compile")
    full, a = _params(), _params()
    opt_full = do.Adan(full, lr=1e-2, weight_decay=0.05)
    opt_a = do.Adan(a, lr=1e-2, weight_decay=0.05)
    for t in range(3):
        _grads(full, t)
        opt_full.step()
        _grads(a, t)
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt_b = do.Adan(b, lr=1e-2, weight_decay=0.05)
    for t in range(2):  # its own state and kept buffers, other values
        _grads(b, 50 + t)
        opt_b.step()
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    # the replaced states kept alive (a user's reference): only the identity check sees them go
    replaced = [t for p in b for t in opt_b.state[p].values()]
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    for t in range(3, 6):
        _grads(full, t)
        opt_full.step()
        _grads(b, t)
        opt_b.step()
    for x, y in zip(_state(opt_b, b), _state(opt_full, full)):
        assert torch.equal(x, y)
    del replaced


def test_a_column_of_mixed_dtypes_keeps_its_tensors():
    """A state column that is not one dtype is copied in and out each step as before (its
    tensors, and their dtypes, stay); a column of one dtype becomes views of its buffer."""
    from distopt.optim._core import ParamView

    gen = torch.Generator().manual_seed(0)
    views = []
    for i, n in enumerate((3, 5, 4)):
        p = nn.Parameter(torch.randn(n, generator=gen))
        st = {
            "a": torch.randn(n, generator=gen),
            "b": torch.randn(n, generator=gen, dtype=torch.float64 if i == 1 else torch.float32),
        }
        views.append(ParamView(p, p.detach(), torch.randn(n, generator=gen), p.shape, False, st))
    mixed = [v.state["b"] for v in views]
    uniform = [v.state["a"].clone() for v in views]
    c = P._Concat(("test", id(views)), views, ("a", "b"), False)
    assert [v.state["b"] for v in views] == mixed  # the same objects (identity)
    assert [v.state["b"].dtype for v in views][1] == torch.float64
    a = [v.state["a"] for v in views]
    assert all(t._base is c.bufs[1] for t in a) and all(map(torch.equal, a, uniform))
    assert c.holds(views, ("a", "b"))
    mixed[2].fill_(7.0)  # an in-place write to a copied state: read by the next fill
    p_buf, g, (a_buf, b_buf) = c.fill(views)
    assert torch.equal(b_buf[8:], torch.full((4,), 7.0)) and a_buf is c.bufs[1]
    a_buf.add_(1.0)
    b_buf.add_(1.0)
    P._scatter((p_buf, g, (a_buf, b_buf)), c)
    assert torch.equal(mixed[2], torch.full((4,), 8.0))  # written back
    assert all(torch.equal(t, u + 1.0) for t, u in zip(a, uniform))  # views: updated in place


def test_kept_gradient_aliases_follow_the_gradient(compiled, monkeypatch):
    """A gradient that stays the same tensor across steps keeps its flat alias (the per-tensor
    route); written in place it is read anew each step, and given new memory (``set_``),
    replaced, or given a non-contiguous layout, the next step uses the new values: bit for bit
    the run whose gradients are new tensors every step (which never reuses an alias)."""
    monkeypatch.setattr(K, "SMALL", 4)  # every tensor of 4 elements or more: its own call
    compiled("compile")
    out, kept = {}, []
    for how in ("fresh", "kept"):
        params = _params()
        opt = do.Nadam(params, lr=1e-2, weight_decay=0.05)
        _grads(params, 0)
        g0 = params[0].grad
        for step in range(6):
            gen = torch.Generator().manual_seed(2000 + step)
            new = [torch.randn(p.shape, generator=gen) for p in params]
            for p, g in zip(params, new):
                if how == "fresh":
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)  # in place: the same gradient tensors
            if how == "kept" and step == 2:
                params[0].grad.set_(new[0].clone())  # new memory, same object
            if how == "kept" and step == 3:
                params[1].grad = new[1].clone()  # replaced
            if step == 4:  # a non-contiguous gradient (the unflattened route), then back
                params[3].grad = new[3].clone().transpose(0, 2).contiguous().transpose(0, 2)
            opt.step()
            if how == "kept" and step in (0, 1):
                kept.append(P._grads[id(g0)][4])
        out[how] = [t for p in params for t in (p, *opt.state[p].values()) if torch.is_tensor(t)]
    assert kept[0] is kept[1]  # the same alias on the second step
    for a, b in zip(out["fresh"], out["kept"]):
        assert torch.equal(a, b)
