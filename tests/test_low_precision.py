"""bf16/fp16 parameters: the fp32 master copy is persistent optimizer state.

For every optimizer in the case table, a bf16 (and fp16) run must be *exactly* fp32 training
on the master copy: the same gradients (bf16-representable values), the same fp32 maths on the
master, and the low-precision parameter is the master rounded once per step.  The master is
allocated once (no fp32 copy of a parameter per step: allocations are counted against the fp32
run of the same optimizer), survives ``state_dict``/``load_state_dict`` and distopt checkpoints
in fp32, and follows writes to the parameters made outside the step.
"""

from __future__ import annotations

import collections
import io

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import distopt.optim as do
from distopt.optim._core import MASTER_KEY
from tests.optim_cases import CASES
from tests.problems import make_params

IDS = [c.id for c in CASES]
LOW = [torch.bfloat16, torch.float16]
STEPS = 4


def _grads(params, step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Gradients of step ``step``, rounded to ``dtype`` (so both runs see the same values)."""
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=g) * 0.1).to(dtype) for p in params]


def _step(opt, params, grads, create_graph: bool) -> None:
    opt.zero_grad(set_to_none=True)
    if create_graph:  # Adahessian: gradients with a graph: g + p, Hessian 1 (p, not the master)
        loss = sum((g.to(p.dtype) * p).sum() + 0.5 * (p * p).sum() for p, g in zip(params, grads))
        loss.backward(create_graph=True)
    else:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
    opt.step()


def _master(opt, p):
    st = opt.state[p] if p in opt.state else opt.base_optimizer.state[p]
    return st[MASTER_KEY]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_precision_is_fp32_training_on_the_master(case, dtype):
    lo = make_params(dtype=dtype)
    hi = [torch.nn.Parameter(p.detach().float()) for p in lo]  # same values, fp32
    opt_lo, opt_hi = case.make(lo), case.make(hi)
    masters = None
    for t in range(STEPS):
        grads = _grads(lo, t, dtype)
        _step(opt_lo, lo, grads, case.create_graph)
        _step(opt_hi, hi, [g.float() for g in grads], case.create_graph)
        now = [_master(opt_lo, p) for p in lo]
        if masters is None:
            masters = now
        for i, (m, m0) in enumerate(zip(now, masters)):
            assert m is m0, f"{case.id}: the master copy of parameter {i} was replaced at step {t}"
        # exact fp32 maths on the master; Adahessian's gradients depend on the (rounded) parameter
        tol = 3e-2 if case.create_graph else 1e-6
        for i, (p, m, h) in enumerate(zip(lo, now, hi)):
            assert m.dtype == torch.float32
            torch.testing.assert_close(
                m.view(h.shape),
                h.detach(),
                rtol=tol,
                atol=tol / 10,
                msg=lambda s, i=i, t=t: f"{case.id}: master {i} at step {t}: {s}",
            )
            # one cast of the master writes the parameter
            assert torch.equal(p.detach(), m.view(p.shape).to(dtype)), f"{case.id}: parameter {i}"
    moved = sum(
        float((h.detach() - p0.detach().float()).abs().sum())
        for h, p0 in zip(hi, make_params(dtype=dtype))
    )
    assert moved > 1e-4, f"{case.id}: the optimizer did not move the parameters"


class _NewFloat32(TorchFunctionMode):
    """Counts fresh fp32 tensors with one of ``sizes`` elements: outputs of an op whose storage
    is none of the op's inputs' storages and none of the ``known`` tensors' (parameters,
    gradients, state).  ``known`` holds the tensors themselves, so their storage stays alive and
    its address cannot be taken by a new allocation (comparing addresses of freed storages made
    the count depend on the allocator's history)."""

    def __init__(self, sizes: set[int], known: list[torch.Tensor]) -> None:
        super().__init__()
        self.sizes, self.known = sizes, known
        self._known_ptrs = {t.untyped_storage().data_ptr() for t in known}
        self.count: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float32
                and t.numel() in self.sizes
                and t.untyped_storage().data_ptr() not in inputs
                and t.untyped_storage().data_ptr() not in self._known_ptrs
            ):
                self.count[getattr(func, "__name__", str(func))] += 1
        return out


def _allocations(case, dtype: torch.dtype, steps: int) -> int:
    params = make_params(dtype=dtype)
    opt = case.make(params)
    for t in range(2):  # state created
        _step(opt, params, _grads(params, t, dtype), case.create_graph)
    grads = [_grads(params, 2 + t, dtype) for t in range(steps)]
    state = opt.state if hasattr(opt, "state") else {}
    known = [
        obj
        for obj in [
            *params,
            *(p.grad for p in params),
            *(v for st in state.values() for v in st.values()),
            *(g for gs in grads for g in (gs if isinstance(gs, (list, tuple)) else [gs])),
        ]
        if isinstance(obj, torch.Tensor)
    ]
    counter = _NewFloat32({p.numel() for p in params if p.numel() > 4}, known)
    with counter:
        for g in grads:
            _step(opt, params, g, case.create_graph)
    return sum(counter.count.values())


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if not c.create_graph],
    ids=[c.id for c in CASES if not c.create_graph],
)
def test_no_fp32_copy_of_the_parameters_per_step(case):
    """Per step a bf16 run allocates at most one parameter-sized fp32 tensor per parameter more
    than the fp32 run of the same optimizer: the gradient's cast.  The old per-step master copy
    would make it two."""
    steps = 3
    n = sum(1 for p in make_params() if p.numel() > 4)
    extra = _allocations(case, torch.bfloat16, steps) - _allocations(case, torch.float32, steps)
    assert extra <= steps * n, (
        f"{case.id}: {extra} fp32 parameter-sized allocations in {steps} steps beyond fp32's"
    )


@pytest.mark.parametrize("name", ["adamw", "lamb", "adafactor", "lookahead_adamw", "sgdp", "muon"])
def test_master_survives_state_dict_round_trip(name):
    def make(ps):
        return do.create_optimizer_v2(ps, name, lr=1e-2, weight_decay=0.01)

    a, b = make_params(dtype=torch.bfloat16), make_params(dtype=torch.bfloat16)
    opt_a = make(a)
    for t in range(3):
        _step(opt_a, a, _grads(a, t, torch.bfloat16), False)
    opt_b = make(b)
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    buf = io.BytesIO()
    torch.save(
        opt_a.state_dict(), buf
    )  # as a checkpoint file would (torch aliases loaded `step` tensors)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    for pa, pb in zip(a, b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        for k, v in sa.items():
            if isinstance(v, torch.Tensor) and k != "step" and v.is_floating_point():
                assert sb[k].dtype == torch.float32, f"{name}: {k} loaded as {sb[k].dtype}"
                assert torch.equal(sb[k], v), f"{name}: {k} changed on load"
    for t in range(3, 6):
        g = _grads(a, t, torch.bfloat16)
        _step(opt_a, a, g, False)
        _step(opt_b, b, g, False)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{name}: parameter {i} differs after resuming"
        assert torch.equal(_master(opt_a, x), _master(opt_b, y)), (
            f"{name}: master {i} differs after resuming"
        )


def test_write_to_parameter_outside_step_refreshes_master():
    params = make_params(dtype=torch.bfloat16)
    opt = do.AdamW(params, lr=1e-2)
    _step(opt, params, _grads(params, 0, torch.bfloat16), False)
    with torch.no_grad():
        params[0].fill_(0.5)  # e.g. model.load_state_dict
    m = _master(opt, params[0])
    _step(opt, params, _grads(params, 1, torch.bfloat16), False)
    assert _master(opt, params[0]) is m
    # the update started from 0.5, not from the stale master
    assert (m - 0.5).abs().max() < 0.05, "the master did not follow the write to the parameter"
    # refresh_masters: the explicit form (what the sharding layer calls)
    with torch.no_grad():
        params[1].fill_(-2.0)
    opt.refresh_masters([params[1]])
    assert torch.equal(_master(opt, params[1]), torch.full_like(_master(opt, params[1]), -2.0))


def test_master_in_distopt_checkpoint(tmp_path):
    import distopt.checkpoint as ckpt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(torch.bfloat16)
    opt = do.AdamW(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    for t in range(3):
        _step(opt, params, _grads(params, t, torch.bfloat16), False)
    ckpt.save(tmp_path / "c", model=model, optimizer=opt)
    model2 = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(torch.bfloat16)
    opt2 = do.AdamW(model2.parameters(), lr=1e-2)
    ckpt.load(tmp_path / "c", model=model2, optimizer=opt2)
    params2 = list(model2.parameters())
    for p, q in zip(params, params2):
        assert opt2.state[q][MASTER_KEY].dtype == torch.float32
        assert torch.equal(opt.state[p][MASTER_KEY], opt2.state[q][MASTER_KEY])
    for t in range(3, 5):
        g = _grads(params, t, torch.bfloat16)
        _step(opt, params, g, False)
        _step(opt2, params2, g, False)
    for p, q in zip(params, params2):
        assert torch.equal(p, q) and torch.equal(
            opt.state[p][MASTER_KEY], opt2.state[q][MASTER_KEY]
        )
