"""Device contracts: distopt's optimizers, ZeRO-1/2 and FSDP2 on CUDA tensors (and NCCL).

Without CUDA, what can run here runs on other devices:

* every case of the optimizer table steps on the ``meta`` device (no data): an op that drags a
  CPU tensor into the maths, or reads a value back to the host, fails there as it would stall or
  fail on a GPU;
* the world-size-1 ZeRO/FSDP2 test runs on gloo/CPU (NCCL on a GPU), so its code is exercised.

With CUDA (``launch/gpu-check.sh`` runs this file on one GPU): the whole case table on CUDA equals
the CPU results; state lives on the parameter's device (torch's fused Adam path's ``step``
included); bf16 parameters keep a persistent fp32 master on the GPU; ``torch.amp.GradScaler`` with
every optimizer.  ``DISTOPT_GPU_CHECK_OUT=<dir>`` writes the per-case error table there.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from distopt.optim._core import MASTER_KEY, ParamView, fused_steps
from tests.dist import device, run_distributed
from tests.optim_cases import CASES
from tests.problems import make_params

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="no CUDA device visible (launch/gpu-check.sh runs these on a GPU)"
)
STEPS = 8
# Kron draws its preconditioner-update decisions from a torch.Generator on the parameter's
# device, which the meta device cannot create.
NO_META = {"kron", "kronw-stochastic", "kron-flatten-diag"}


def _quadratic(params, step: int) -> torch.Tensor:
    """tests.problems.quadratic_loss with its coefficients on each parameter's device."""
    g = torch.Generator().manual_seed(100003 + step)
    total = 0.0
    for p in params:
        a = (torch.rand(p.shape, generator=g) + 0.5).to(p.device)
        b = torch.randn(p.shape, generator=g).to(p.device)
        pf = p.float()
        total = total + (0.5 * a * pf * pf + b * pf).sum()
    return total


def _train(case, dev, dtype=torch.float32, steps=STEPS, scaler=None):
    params = [torch.nn.Parameter(p.detach().to(dev)) for p in make_params(dtype=dtype)]
    opt = case.make(params)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _quadratic(params, t)
        if scaler is not None:
            scaler.scale(loss).backward(create_graph=case.create_graph)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward(create_graph=case.create_graph)
            opt.step()
    return params, opt


def _state_of(opt, p):
    st = opt.state.get(p)
    if st is None and getattr(opt, "base_optimizer", None) is not None:
        st = opt.base_optimizer.state.get(p)
    return st or {}


def _misplaced(opt, params) -> list[str]:
    """State tensors not on their parameter's device (``step`` may stay on the CPU, as torch's
    non-fused, non-capturable path keeps it)."""
    bad = []
    for i, p in enumerate(params):
        for k, v in _state_of(opt, p).items():
            if (
                isinstance(v, torch.Tensor)
                and v.device != p.device
                and not (k == "step" and v.device.type == "cpu")
            ):
                bad.append(f"param {i} state {k!r} on {v.device}")
    return bad


# --------------------------------------------------------------------------- meta (runs on CPU CI)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if not c.create_graph and c.id not in NO_META],
    ids=[c.id for c in CASES if not c.create_graph and c.id not in NO_META],
)
def test_case_steps_on_meta_device(case):
    """No CPU tensor mixed into the maths and no host read: both fail on ``meta``."""
    params = [torch.nn.Parameter(p.detach().to("meta")) for p in make_params()]
    opt = case.make(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    assert not _misplaced(opt, params), _misplaced(opt, params)


def test_fused_steps_follow_the_parameter_device():
    data = torch.empty(3, device="meta")
    state = {"step": torch.tensor(4.0)}
    view = ParamView(data, data, data, data.shape, False, state)
    (step,) = fused_steps([view])
    assert step.device.type == "meta" and step.dtype == torch.float32 and state["step"] is step
    cpu = ParamView(
        torch.zeros(2),
        torch.zeros(2),
        torch.zeros(2),
        torch.Size([2]),
        False,
        {"step": torch.tensor(1.0)},
    )
    assert fused_steps([cpu])[0] is cpu.state["step"]  # already on the device: kept


# --------------------------------------------------------------------------- CUDA


def _report(name: str, lines: list[str]) -> None:
    out = os.environ.get("DISTOPT_GPU_CHECK_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text("\n".join(lines) + "\n")


@needs_cuda
def test_case_table_on_cuda_matches_cpu():
    """Every case: CUDA parameters after STEPS steps equal the CPU run (fp32), state on the GPU."""
    failures, table = [], ["case | max abs diff | max rel diff | result"]
    for case in CASES:
        tol = max(case.tol, 1e-4) * (10 if case.create_graph else 1)
        try:
            cpu, _ = _train(case, "cpu")
            gpu, opt = _train(case, "cuda")
        except Exception as e:  # noqa: BLE001 - every case is reported, not just the first
            failures.append(f"{case.id}: {type(e).__name__}: {e}")
            table.append(f"{case.id} | - | - | {type(e).__name__}")
            continue
        abs_d = max(float((a.detach() - b.detach().cpu()).abs().max()) for a, b in zip(cpu, gpu))
        rel_d = max(
            float(((a.detach() - b.detach().cpu()).abs() / (a.detach().abs() + 1e-6)).max())
            for a, b in zip(cpu, gpu)
        )
        ok = all(
            torch.allclose(a.detach(), b.detach().cpu(), rtol=tol, atol=tol)
            for a, b in zip(cpu, gpu)
        )
        bad = _misplaced(opt, gpu)
        table.append(
            f"{case.id} | {abs_d:.2e} | {rel_d:.2e} | {'ok' if ok and not bad else 'FAIL'}"
        )
        if not ok:
            failures.append(
                f"{case.id}: CUDA differs from CPU (max abs {abs_d:.2e}, rel {rel_d:.2e}, tol {tol:g})"
            )
        if bad:
            failures.append(f"{case.id}: " + "; ".join(bad))
    _report("cases_cuda_vs_cpu.txt", table)
    assert not failures, "\n".join(failures)


@needs_cuda
def test_fused_adamw_keeps_step_on_the_gpu():
    case = next(c for c in CASES if c.id == "adamw")
    params, opt = _train(case, "cuda", steps=3)
    for p in params:
        step = opt.state[p]["step"]
        assert step.device == p.device and float(step) == 3.0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_on_cuda(dtype):
    failures = []
    for case in CASES:
        try:
            params, opt = _train(case, "cuda", dtype=dtype, steps=4)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{case.id}: {type(e).__name__}: {e}")
            continue
        for i, p in enumerate(params):
            master = _state_of(opt, p).get(MASTER_KEY)
            if master is None or master.dtype != torch.float32 or master.device != p.device:
                failures.append(f"{case.id}: param {i} has no fp32 master on {p.device}")
            elif not torch.equal(master.view(p.shape).to(dtype), p.detach()):
                failures.append(f"{case.id}: param {i} is not its master rounded once")
            if not torch.isfinite(p.detach().float()).all():
                failures.append(f"{case.id}: param {i} not finite")
        failures += [f"{case.id}: {m}" for m in _misplaced(opt, params)]
    assert not failures, "\n".join(failures)


@needs_cuda
def test_grad_scaler_with_every_optimizer():
    """torch.amp.GradScaler (scale 2**10, no overflow): the same parameters as without it."""
    failures = []
    for case in CASES:
        if case.create_graph:
            continue  # GradScaler does not scale Hessian-vector products
        try:
            ref, _ = _train(case, "cuda", steps=4)
            scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
            got, _ = _train(case, "cuda", steps=4, scaler=scaler)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{case.id}: {type(e).__name__}: {e}")
            continue
        tol = max(case.tol, 1e-4)
        if not all(
            torch.allclose(a.detach(), b.detach(), rtol=tol, atol=tol) for a, b in zip(ref, got)
        ):
            failures.append(f"{case.id}: differs with GradScaler")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- ZeRO / FSDP2, world 1

WORLD1_CASES = ["adamw", "lamb", "adafactor", "muon", "sgdp", "lookahead_adamw", "nvnovograd"]


def _tiny(dev, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 5)).to(
        dev, dtype
    )


def _fit(model, opt, dev, steps=4):
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(8, 6, generator=g).to(dev, next(model.parameters()).dtype)
        y = torch.randn(8, 5, generator=g).to(dev)
        opt.zero_grad(set_to_none=True)
        ((model(x).float() - y) ** 2).mean().backward()
        opt.step()


def _full(model):
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
        for p in model.parameters()
    ]


def _world1_worker(case_ids):
    import distopt
    from tests.optim_cases import CASES as ALL

    dev = device()
    by_id = {c.id: c for c in ALL}
    out = {}
    for cid in case_ids:
        case = by_id[cid]
        ref = _tiny(dev)
        _fit(ref, case.make(ref.parameters()), dev)
        want = _full(ref)
        runs = {}
        for stage in (1, 2):
            m = _tiny(dev)
            sm, opt = distopt.shard(m, case.make(m.parameters()), stage=stage)
            _fit(sm, opt, dev)
            runs[f"zero{stage}"] = _full(m)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        m = _tiny(dev)
        fully_shard(m, mesh=init_device_mesh(dev.type, (1,)))
        opt = case.make(m.parameters())
        _fit(m, opt, dev)
        runs["fsdp2"] = _full(m)
        out[cid] = {
            k: max(float((a - b).abs().max()) for a, b in zip(want, v)) for k, v in runs.items()
        }
    # bf16 parameters: engine master rows (master_dtype) and the optimizer's own master
    for master_dtype in (torch.float32, None):
        ref = _tiny(dev, torch.bfloat16)
        _fit(ref, by_id["adamw"].make(ref.parameters()), dev)
        m = _tiny(dev, torch.bfloat16)
        sm, opt = distopt.shard(
            m, by_id["adamw"].make(m.parameters()), stage=2, master_dtype=master_dtype
        )
        _fit(sm, opt, dev)
        name = f"adamw-bf16-master_dtype={master_dtype}"
        out[name] = {"zero2": max(float((a - b).abs().max()) for a, b in zip(_full(ref), _full(m)))}
        masters = [v for st in opt.state.values() for k, v in st.items() if k == MASTER_KEY]
        out[name]["optimizer masters"] = float(len(masters))  # none when the engine holds them
    # bf16 rows without master_dtype (the optimizer's master): model.load_state_dict between
    # steps must reach the master; a step with lr 0 then leaves the loaded values in place
    m = _tiny(dev, torch.bfloat16)
    sm, opt = distopt.shard(m, by_id["adamw"].make(m.parameters()), stage=2)
    _fit(sm, opt, dev, steps=2)
    sm.load_state_dict({k: torch.full_like(v, 0.25) for k, v in m.state_dict().items()})
    for g in opt.param_groups:
        g["lr"] = 0.0
    _fit(sm, opt, dev, steps=1)
    reload_err = max(float((p.detach().float() - 0.25).abs().max()) for p in m.parameters())
    return {"device": str(dev), "results": out, "reload": reload_err}


@functools.cache
def _world1_results():
    (res,) = run_distributed(_world1_worker, 1, WORLD1_CASES, timeout=240)
    return res


@pytest.mark.distributed
def test_zero_and_fsdp2_at_world_size_one():
    """ZeRO-1/2 and FSDP2 code paths at world size 1: NCCL on a GPU, gloo on the CPU."""
    res = _world1_results()
    lines = [f"device {res['device']}"]
    failures = []
    for cid, modes in res["results"].items():
        for mode, err in modes.items():
            lines.append(f"{cid} {mode}: {err:.2e}")
            if mode == "optimizer masters":
                expected = 0.0 if "float32" in cid else 4.0  # 4 bf16 tensors, one master each
                if err != expected:
                    failures.append(f"{cid}: {err:g} optimizer masters, expected {expected:g}")
            elif err > 1e-5:
                failures.append(f"{cid} {mode}: differs from single-process training by {err:.2e}")
    _report("world1.txt", lines)
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
def test_zero_bf16_optimizer_master_follows_model_load_state_dict():
    err = _world1_results()["reload"]
    assert err == 0.0, (
        f"after model.load_state_dict the step started from a stale master ({err:.3g} off)"
    )
