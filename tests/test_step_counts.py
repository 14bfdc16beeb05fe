"""Step counters advanced as views of one buffer (``distopt.optim._step_counts``).

The per-parameter ``state["step"]`` tensors stay what checkpoints and torch-compatible state
dicts hold; what changes is that a group's counters share one buffer, advanced by one op and
read from its memory.  These tests check that every way a counter can change outside that path
(a replaced or loaded counter, an in-place write, a skipped parameter, an added parameter, a
save and load) gives exactly the counts the per-counter path gives.
"""

from __future__ import annotations

import gc
import io

import torch
from torch import nn

import distopt.optim as do
from distopt.optim import _step_counts as SC


def _model(n: int = 5, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(3 + i, generator=gen)) for i in range(n)]


def _grads(params: list[nn.Parameter], step: int, skip: set[int] = frozenset()) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen)
        p.grad = None if i in skip else g


def _steps(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[float]:
    return [float(opt.state[p]["step"]) for p in params]


def _advance_as_torch(steps: list[torch.Tensor]) -> list[float]:
    """The per-counter path (what torch.optim does): add 1 to each, read each."""
    torch._foreach_add_(steps, 1.0)
    return [float(s) for s in steps]


class _View:
    """The part of a ParamView that the counters use."""

    def __init__(self, state: dict) -> None:
        self.state = state


def test_counters_share_one_buffer_and_count_as_torch_does():
    params = _model()
    opt = do.Nadam(params, lr=0.1)
    for t in range(4):
        _grads(params, t)
        opt.step()
    steps = [opt.state[p]["step"] for p in params]
    base = steps[0]._base
    assert base is not None and all(s._base is base for s in steps), "not one buffer"
    assert all(s.dim() == 0 and s.dtype == torch.float32 and s.device.type == "cpu" for s in steps)
    assert _steps(opt, params) == [4.0] * 5


def test_values_are_read_from_the_counters_memory():
    """An in-place write to a counter (fill_, a write through .data or NumPy, a checkpoint read
    into it) is what the next step counts from; float32 rounding as torch's (2**24 + 1)."""
    states = [{"step": torch.zeros(())} for _ in range(4)]
    views = [_View(s) for s in states]
    assert SC.advance(views) == [1.0] * 4
    assert SC.advance(views) == [2.0] * 4
    states[1]["step"].fill_(10.0)
    states[2]["step"].data.fill_(20.0)  # no version bump
    states[3]["step"].numpy()[()] = 2.0**24  # no version bump, float32: 2**24 + 1 == 2**24
    assert SC.advance(views) == [3.0, 11.0, 21.0, 2.0**24]
    ref = [torch.tensor(v) for v in (2.0, 10.0, 20.0, 2.0**24)]
    assert _advance_as_torch(ref) == [3.0, 11.0, 21.0, 2.0**24]


def test_replaced_counters_make_a_new_block():
    """A counter replaced by a new tensor (what load_state_dict does) is advanced, not the
    block's old view (fails if the block is trusted without checking its views)."""
    states = [{"step": torch.zeros(())} for _ in range(3)]
    views = [_View(s) for s in states]
    SC.advance(views)
    old = [s["step"] for s in states]
    states[1]["step"] = torch.tensor(7.0)
    assert SC.advance(views) == [2.0, 8.0, 2.0]
    assert float(old[1]) == 1.0, "the replaced counter was advanced"
    assert [float(s["step"]) for s in states] == [2.0, 8.0, 2.0]
    assert SC.advance(views) == [3.0, 9.0, 3.0]
    base = states[0]["step"]._base
    assert all(s["step"]._base is base for s in states) and base is not old[0]._base


def test_a_skipped_parameter_does_not_advance():
    params = _model()
    opt = do.Nadam(params, lr=0.1)
    for t in range(3):
        _grads(params, t)
        opt.step()
    before = [opt.state[p]["step"] for p in params]
    for t in range(3, 7):  # parameter 2 without a gradient on odd steps
        _grads(params, t, skip={2} if t % 2 else set())
        opt.step()
    assert _steps(opt, params) == [7.0, 7.0, 5.0, 7.0, 7.0]
    # the subset steps kept the block: the same counter objects
    assert all(opt.state[p]["step"] is b for p, b in zip(params, before))


def test_first_step_without_a_gradient_then_with_one():
    params = _model()
    opt = do.Nadam(params, lr=0.1)
    _grads(params, 0, skip={4})
    opt.step()
    assert 4 not in [i for i, p in enumerate(params) if p in opt.state and opt.state[p]]
    for t in range(1, 4):
        _grads(params, t)
        opt.step()
    assert _steps(opt, params) == [4.0, 4.0, 4.0, 4.0, 3.0]


def test_parameters_added_to_a_group_and_groups_added():
    params = _model(4)
    opt = do.Nadam(params[:3], lr=0.1)
    for t in range(2):
        _grads(params, t)
        opt.step()
    opt.param_groups[0]["params"].append(params[3])  # a parameter added to the group
    extra = _model(2, seed=1)
    opt.add_param_group({"params": extra})
    for t in range(2, 5):
        _grads(params + extra, t)
        opt.step()
    assert _steps(opt, params) == [5.0, 5.0, 5.0, 3.0]
    assert _steps(opt, extra) == [3.0, 3.0]


def test_load_state_dict_and_save_load_resume_exactly():
    """A run saved at step 3 (torch.save), loaded into a fresh optimizer (whose counters were
    at step 1) and continued equals the uninterrupted run bit for bit, counters included."""
    full, a = _model(), _model()
    opt_full = do.Lamb(full, lr=0.01, weight_decay=0.01)
    opt_a = do.Lamb(a, lr=0.01, weight_decay=0.01)
    for t in range(3):
        _grads(full, t)
        opt_full.step()
        _grads(a, t)
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt_b = do.Lamb(b, lr=0.01, weight_decay=0.01)
    _grads(b, 99)
    opt_b.step()  # its own counters at 1, as a block
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    assert _steps(opt_b, b) == [3.0] * 5
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    for t in range(3, 6):
        _grads(full, t)
        opt_full.step()
        _grads(b, t)
        opt_b.step()
    assert _steps(opt_b, b) == [6.0] * 5 == _steps(opt_full, full)
    for p, q in zip(b, full):
        assert torch.equal(p, q)
        for k, v in opt_full.state[q].items():
            assert torch.equal(opt_b.state[p][k], v), k


def test_other_counters_keep_the_per_counter_path():
    """float64 counters (a foreign checkpoint) are advanced one by one and kept as they are."""
    states = [{"step": torch.zeros((), dtype=torch.float64)} for _ in range(3)]
    views = [_View(s) for s in states]
    ids = [id(s["step"]) for s in states]
    assert SC.advance(views) == [1.0] * 3
    assert SC.advance(views) == [2.0] * 3
    assert [id(s["step"]) for s in states] == ids
    assert all(s["step"].dtype == torch.float64 and s["step"]._base is None for s in states)


def test_blocks_go_with_the_optimizer():
    params = _model()
    opt = do.Nadam(params, lr=0.1)
    _grads(params, 0)
    opt.step()
    key = id(opt.state[params[0]]["step"]._base)
    assert key in SC._blocks
    del opt
    gc.collect()
    assert key not in SC._blocks, "the block outlived its counters"


def test_a_deep_copied_optimizer_counts_on_its_own():
    """copy.deepcopy of an optimizer (its counters: copies sharing a new storage, not views of
    the block) counts on its own, and the original keeps counting."""
    import copy

    params = _model()
    opt = do.Nadam(params, lr=0.1)
    for t in range(2):
        _grads(params, t)
        opt.step()
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for t in range(2, 5):
        _grads(params, t)
        opt.step()
    _grads(twin_params, 9)
    twin.step()
    assert _steps(opt, params) == [5.0] * 5
    assert _steps(twin, twin_params) == [3.0] * 5
