"""distopt optimizers as DeepSpeed client optimizers (2 CPU processes, gloo).

One ``run_distributed`` call (DeepSpeed start-up is slow: its first ZeRO engine imports
torch.compile machinery, and its CPU communication op is JIT-built once per machine) checks:

* ZeRO-1 and ZeRO-2 (launch/deepspeed/zero1.json, zero2.json, gradient clipping 1.0) with
  element-wise distopt optimizers and a distopt schedule, through
  ``distopt.integrations.deepspeed.initialize``: the parameters and lrs after a few steps equal
  distopt's own ZeRO (``distopt.shard``, same stage, ``distopt.clip_grad_norm_``);
* ZeRO-Offload (launch/deepspeed/zero2-offload.json): the distopt optimizer runs on the CPU
  partitions (same numbers) and the warning says so;
* a shape-aware optimizer (Lamb) reaching DeepSpeed through plain ``deepspeed.initialize``
  refuses at its first step, naming itself, saying why, pointing to ``distopt.shard``, before any
  parameter changed; through ``initialize`` it is refused before DeepSpeed is touched.

In-process tests cover the config checks (no DeepSpeed engine needed).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.dist import device, rank, run_distributed

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
ELEMENTWISE = {
    "AdamW": {"lr": 2e-2, "weight_decay": 0.1},
    "Nadam": {"lr": 2e-2},
    "RAdam": {"lr": 2e-2},
    "AdaBelief": {"lr": 2e-2},
    "MADGRAD": {"lr": 1e-2},
    "RMSpropTF": {"lr": 1e-2, "momentum": 0.9},
}
REFUSAL_WORDS = ("Lamb", "flat 1-D", "whole-tensor statistics", "distopt.shard", "No update was applied")


def _dev() -> torch.device:
    try:
        return device()
    except RuntimeError:  # in-process tests
        return torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))
    return model.to(_dev())


def _batch(step: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + r)
    x, y = torch.randn(8, 7, generator=g), 3 * torch.randn(8, 3, generator=g)
    return x.to(_dev()), y.to(_dev())


def _opt(name: str, model: nn.Module):
    import distopt.optim as O
    from distopt.schedules import get_linear_schedule_with_warmup

    opt = getattr(O, name)(model.parameters(), **ELEMENTWISE.get(name, {"lr": 1e-2}))
    return opt, get_linear_schedule_with_warmup(opt, 1, STEPS + 1)


def _distopt_zero(name: str, stage: int) -> tuple[dict, list]:
    import distopt

    model = _model()
    opt, sched = _opt(name, model)
    sharded, opt = distopt.shard(model, opt, stage=stage)
    lrs = []
    for step in range(STEPS):
        x, y = _batch(step, rank())
        nn.functional.mse_loss(sharded(x), y).backward()
        distopt.clip_grad_norm_(sharded, 1.0)
        opt.step()
        sched.step()
        sharded.zero_grad()
        lrs.append(opt.param_groups[0]["lr"])
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}, lrs


def _deepspeed(name: str, config: str, handler: logging.Handler | None = None) -> tuple[dict, list]:
    from distopt.integrations.deepspeed import initialize

    model = _model()
    opt, sched = _opt(name, model)
    engine, _, _, ds_sched = initialize(model, opt, sched, config=ROOT / config)
    assert ds_sched is sched
    lrs = []
    for step in range(STEPS):
        x, y = _batch(step, rank())
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()
        lrs.append(opt.param_groups[0]["lr"])
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}, lrs


def _worker() -> dict:
    os.environ.setdefault("LOCAL_RANK", str(rank()))
    if device().type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    import distopt.optim as O
    from distopt.integrations.deepspeed import initialize

    out: dict = {"match": {}, "refusals": {}}
    for stage in (1, 2):
        for name in ELEMENTWISE if stage == 2 else ("AdamW",):
            got = _deepspeed(name, f"launch/deepspeed/zero{stage}.json")
            out["match"][(name, stage)] = (got, _distopt_zero(name, stage))

    # ZeRO-Offload: the distopt optimizer itself runs on the CPU partitions, and says so
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("distopt.integrations.deepspeed")
    logger.addHandler(Keep())
    got = _deepspeed("AdamW", "launch/deepspeed/zero2-offload.json")
    out["match"][("AdamW", "offload")] = (got, _distopt_zero("AdamW", 2))
    out["offload_log"] = records

    # Lamb through plain deepspeed.initialize: refused at the first step, nothing updated
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = O.Lamb(model.parameters(), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    x, y = _batch(0, rank())
    engine.backward(nn.functional.mse_loss(engine(x), y))
    try:
        engine.step()
        out["refusals"]["plain"] = None
    except RuntimeError as exc:
        out["refusals"]["plain"] = str(exc)
    out["unchanged"] = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    out["no_state"] = all(len(s) == 0 for s in opt.state.values())

    # ... and through distopt's initialize: before DeepSpeed sees it
    model = _model()
    try:
        initialize(model, O.Lamb(model.parameters()), config=ROOT / "launch/deepspeed/zero1.json")
        out["refusals"]["initialize"] = None
    except ValueError as exc:
        out["refusals"]["initialize"] = str(exc)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_deepspeed_zero_client_optimizers_two_processes():
    pytest.importorskip("deepspeed")
    results = run_distributed(_worker, 2, timeout=600)
    for r, res in enumerate(results):
        for key, ((ds_p, ds_lr), (ref_p, ref_lr)) in res["match"].items():
            assert ds_lr == pytest.approx(ref_lr, rel=1e-12), (r, key)
            for n in ref_p:
                torch.testing.assert_close(ds_p[n], ref_p[n], rtol=1e-5, atol=1e-6,
                                           msg=f"rank {r} {key} {n}")
        assert any("runs on DeepSpeed's fp32 partitions on the CPU" in m and "NOT replaced" in m
                   for m in res["offload_log"]), res["offload_log"]
        for road, msg in res["refusals"].items():
            assert msg is not None, f"rank {r}: Lamb was not refused via {road}"
            for word in REFUSAL_WORDS:
                assert word in msg, (road, msg)
        assert res["unchanged"] and res["no_state"], "the refused step changed something"
    # both ranks end with the same parameters (the all-gather ran)
    for key in results[0]["match"]:
        for n, p in results[0]["match"][key][0][0].items():
            assert torch.equal(p, results[1]["match"][key][0][0][n]), (key, n)


# --------------------------------------------------------------------------- in-process


def test_check_optimizer_by_options_and_config():
    import distopt.optim as O
    from distopt.integrations.deepspeed import check_optimizer, partitions_are_flat

    params = list(_model().parameters())
    zero = {"zero_optimization": {"stage": 1}}
    check_optimizer(O.AdamW(params), zero)
    check_optimizer(O.RMSpropTF(params, momentum=0.9), zero)
    check_optimizer(O.AdamWeightDecay(params), zero)
    check_optimizer(O.Lamb(params), {"zero_optimization": {"stage": 0}})  # whole tensors: fine
    check_optimizer(torch.optim.Adam(params), zero)  # not distopt's: not judged
    for bad in (
        O.Lamb(params),
        O.Adafactor(params),
        O.AdamP(params),
        O.Lookahead(O.Lars(params, lr=0.1)),
        O.RMSpropTF(params, momentum=0.9, caution=True),
        O.AdamWeightDecay(params, clipnorm=1.0),
        O.AdamWeightDecay(params, global_clipnorm=1.0),
    ):
        with pytest.raises(ValueError, match="cannot run as a DeepSpeed client optimizer") as info:
            check_optimizer(bad, zero)
        assert type(bad).__name__ in str(info.value) and "distopt.shard" in str(info.value)
    assert partitions_are_flat({"bf16": {"enabled": True}}) is not None
    assert partitions_are_flat({"fp16": {"enabled": "auto"}}) is None
    assert partitions_are_flat({}) is None
    with pytest.raises(ValueError, match="cannot run"):
        check_optimizer(O.Lamb(params), {"fp16": {"enabled": True}})


def test_prepare_config_rules(caplog):
    import distopt.optim as O
    from distopt.integrations.deepspeed import prepare_config

    opt = O.AdamW(_model().parameters())
    with pytest.raises(ValueError, match="'optimizer' section"):
        prepare_config(opt, {"optimizer": {"type": "Adam"}})
    with pytest.raises(ValueError, match="'scheduler' section"):
        prepare_config(opt, {"scheduler": {"type": "WarmupLR"}}, lr_scheduler=object())
    cfg = prepare_config(opt, {"zero_optimization": {"stage": 2}}, overrides={"zero_optimization": {"stage": 1}})
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["zero_allow_untested_optimizer"] is True
    off = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with caplog.at_level(logging.WARNING, logger="distopt.integrations.deepspeed"):
        cfg = prepare_config(opt, off)
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert "distopt's AdamW runs on DeepSpeed's fp32 partitions on the CPU" in caplog.text
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer=true"):
        prepare_config(opt, {**off, "zero_force_ds_cpu_optimizer": True})


def test_shipped_deepspeed_configs_are_valid():
    """Every launch/deepspeed/*.json loads, has what the engine needs, no optimizer section."""
    import json

    from distopt.integrations.deepspeed import load_config, zero_stage

    files = sorted((ROOT / "launch" / "deepspeed").glob("*.json"))
    assert {f.name for f in files} >= {"zero1.json", "zero2.json", "zero2-offload.json"}
    for f in files:
        cfg = load_config(f)
        assert cfg == json.loads(f.read_text())
        assert "optimizer" not in cfg and "scheduler" not in cfg, f
        assert isinstance(cfg["train_micro_batch_size_per_gpu"], int), f
        assert zero_stage(cfg) in (1, 2), f
    with pytest.raises(FileNotFoundError):
        load_config(ROOT / "launch" / "deepspeed" / "missing.json")
