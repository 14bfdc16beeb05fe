"""Table-driven optimizer tests: every case in tests/optim_cases.py runs through each check."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from tests.optim_cases import CASES
from tests.problems import TinyMLP, make_params, regression_data, rosenbrock, run_quadratic

IDS = [c.id for c in CASES]


def _close(a, b, tol, what):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x.detach().float(), y.detach().float(), rtol=tol, atol=tol,
                                   msg=lambda m, i=i: f"{what}: parameter {i} differs: {m}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference(case):
    if case.reference is None:
        pytest.skip("no independent reference for this case")
    p1, p2 = make_params(), make_params()
    run_quadratic(case.make(p1), p1, case.steps, case.create_graph)
    run_quadratic(case.reference(p2), p2, case.steps, case.create_graph)
    moved = sum(float((a.detach() - b.detach()).abs().sum()) for a, b in zip(p1, make_params()))
    assert moved > 1e-3, "the optimizer did not move the parameters"
    _close(p1, p2, case.tol, f"{case.id} vs reference")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_peer_library(case):
    if case.peer is None:
        pytest.skip("no peer implementation for this case")
    p2 = make_params()
    peer = case.peer(p2)
    if peer is None:
        pytest.skip("peer library not installed")
    p1 = make_params()
    run_quadratic(case.make(p1), p1, case.steps, case.create_graph)
    run_quadratic(peer, p2, case.steps, case.create_graph)
    _close(p1, p2, case.tol, f"{case.id} vs peer")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_rosenbrock(case):
    xy = torch.nn.Parameter(torch.tensor([-1.0, 1.0]))
    opt = case.make([xy])
    for g in opt.param_groups:  # Rosenbrock's minimum is at (1, 1): no decay pulling elsewhere
        if g.get("weight_decay"):
            g["weight_decay"] = 0.0
        if g.get("lr") is not None:
            g["lr"] = case.rosen_lr
    start = float(rosenbrock(xy))
    for _ in range(case.rosen_steps):
        opt.zero_grad()
        loss = rosenbrock(xy)
        loss.backward(create_graph=case.create_graph)
        opt.step()
    end = float(rosenbrock(xy.detach()))
    assert end < case.rosen_tol and end < start, f"Rosenbrock {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_small_model_converges(case):
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = regression_data()
    opt = case.make(model.parameters())
    for g in opt.param_groups:
        if g.get("lr") is not None:
            g["lr"] = case.model_lr
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward(create_graph=case.create_graph)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip_is_bitwise(case):
    ref = make_params()
    opt = case.make(ref)
    run_quadratic(opt, ref, 8, case.create_graph)

    p = make_params()
    opt1 = case.make(p)
    run_quadratic(opt1, p, 4, case.create_graph)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    p2 = [torch.nn.Parameter(t.detach().clone()) for t in p]
    opt2 = case.make(p2)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    run_quadratic(opt2, p2, 4, case.create_graph, start=4)
    for a, b in zip(ref, p2):
        assert torch.equal(a, b), f"{case.id}: resumed run differs from uninterrupted run"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_precision_params(case, dtype):
    p_lo = make_params(dtype=dtype)
    p_hi = [torch.nn.Parameter(t.detach().float().clone()) for t in p_lo]
    opt = case.make(p_lo)
    run_quadratic(opt, p_lo, 5, case.create_graph)
    run_quadratic(case.make(p_hi), p_hi, 5, case.create_graph)
    for p in p_lo:
        assert p.dtype == dtype and torch.isfinite(p.float()).all()
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                assert v.dtype == torch.float32, "state of low-precision params is kept in fp32"
    # bf16/fp16 storage rounding only: stays near the fp32 trajectory
    for a, b in zip(p_lo, p_hi):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_closure_and_params_without_grad(case):
    params = make_params()
    frozen_before = params[1].detach().clone()
    opt = case.make(params)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad(set_to_none=True)
        live = [p for i, p in enumerate(params) if i != 1]
        from tests.problems import quadratic_loss

        loss = quadratic_loss(live, 0)
        loss.backward(create_graph=case.create_graph)
        return loss

    loss = opt.step(closure)
    assert calls and isinstance(loss, torch.Tensor)
    assert torch.equal(params[1].detach(), frozen_before), "a parameter without grad was updated"
    assert len(opt.state.get(params[1], {})) == 0, "state was created for a parameter without grad"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_param_groups_and_deepcopy(case):
    params = make_params()
    opt = case.make(params[:3])
    opt.add_param_group({"params": params[3:], "lr": opt.param_groups[0]["lr"] and opt.param_groups[0]["lr"] * 0.5})
    run_quadratic(opt, params, 3, case.create_graph)
    clone = copy.deepcopy(opt)
    assert len(clone.param_groups) == 2
    assert all(torch.isfinite(p).all() for p in params)
