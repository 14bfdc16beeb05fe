"""distopt under ``transformers.Trainer`` (distopt.integrations.transformers), on real processes.

One 2-rank launch trains, in one process group: (1) the plain Trainer with DDP and an unsharded
distopt Lamb; (2) ``DistoptTrainer`` with ZeRO-2 and Lamb (checkpoints every 2 steps); (2a)
``DistoptTrainer`` without ZeRO (DDP); (2b) DDP vs ZeRO-1 with losses that are means; (3) the
plain Trainer with torch AdamW (its ``optimizer.pt`` checkpoint); (4) ``DistoptTrainer`` ZeRO-2
AdamW resumed from that plain checkpoint, and a checkpoint without optimizer state refused.  The
test process itself then resumes (2)'s checkpoint at world size 1, with and without ZeRO.  Tiny
GPT-2 built in code, labels padded with -100 so the token counts differ between micro-batches and
ranks, gradient accumulation 2, clipping active.  CPU cost ~35 s (most of it importing
transformers in three processes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.dist import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed

VOCAB, SEQ, N_SAMPLES, STEPS = 64, 8, 32, 4
RTOL, ATOL = 1e-5, 1e-6


# --------------------------------------------------------------------------- pieces


def _launcher_env() -> None:
    """What torchrun would set: the Trainer (through Accelerate) reads the world from it."""
    import torch.distributed as dist

    r, w = dist.get_rank(), dist.get_world_size()
    os.environ.update(
        RANK=str(r),
        WORLD_SIZE=str(w),
        LOCAL_RANK=str(r),
        LOCAL_WORLD_SIZE=str(w),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
        OMP_NUM_THREADS="1",
    )


def make_model():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def make_dataset() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(N_SAMPLES):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[SEQ - (i * 5) % SEQ :] = -100  # 0..7 ignored tokens: uneven counts
        labels[0] = ids[0]
        # "source" is not a forward argument: remove_unused_columns must drop it (and only it)
        out.append({"input_ids": ids, "labels": labels, "source": i})
    return out


def make_args(out: str, world: int, **kw):
    base = dict(
        output_dir=out,
        per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        learning_rate=5e-3,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        max_grad_norm=0.5,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().cpu() for n, p in model.named_parameters()}


def _trainer_groups(trainer, model):
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": trainer.args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def _log(trainer) -> list[tuple[int, float, float]]:
    """(step, loss, pre-clip gradient norm) as the Trainer logged them."""
    return [
        (h["step"], h["loss"], float(h["grad_norm"]))
        for h in trainer.state.log_history
        if "loss" in h
    ]


def _assert_same_log(a: list, b: list, what: str) -> None:
    # The gradient norm catches a gradient scaled twice, which the update of Lamb and Adam
    # (invariant to the gradient's scale) would hide.
    assert [s for s, _, _ in a] == [s for s, _, _ in b], what
    for (s, la, ga), (_, lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5), f"{what}: loss at step {s}"
        assert ga == pytest.approx(gb, rel=1e-5), f"{what}: grad norm at step {s}"


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# --------------------------------------------------------------------------- 2 ranks


def two_rank_runs(root: str) -> dict:
    import distopt
    import distopt.schedules
    from distopt.integrations.transformers import DistoptTrainer
    from distopt.zero import ShardedModule

    _launcher_env()
    root = Path(root)
    ds = make_dataset()
    res: dict = {}

    # (1) reference: the plain Trainer, DDP, distopt Lamb unsharded, distopt cosine schedule
    model = make_model()
    args = make_args(str(root / "ddp"), 2, save_strategy="no")
    ref = transformers.Trainer(model=model, args=args, train_dataset=ds)
    ref.optimizer = distopt.optim.Lamb(_trainer_groups(ref, model), lr=args.learning_rate)
    ref.lr_scheduler = distopt.schedules.get_scheduler("cosine", ref.optimizer, 1, STEPS)
    ref.train()
    res["ddp"] = params(model)
    res["ddp_wrapped"] = type(ref.model_wrapped).__name__

    # (2) DistoptTrainer, ZeRO-2, Lamb by name; checkpoints at steps 2 and 4
    model = make_model()
    tr = DistoptTrainer(
        model=model,
        args=make_args(str(root / "zero2"), 2),
        train_dataset=ds,
        optim="lamb",
        zero_stage=2,
    )
    tr.train()
    res["zero2"] = params(model)
    res["zero2_model_is_user_module"] = tr.model is model
    res["zero2_wrapped_is_sharded"] = isinstance(tr.model_wrapped, ShardedModule)
    info = tr.model_wrapped.shard_info()
    res["zero2_shard"] = (info["params_local"], info["params_total"], info["state_bytes_sharded"])
    res["zero2_log"] = _log(tr)
    res["ddp_log"] = _log(ref)

    # (2a) DistoptTrainer without ZeRO: the Trainer's DDP, distopt's accumulation
    model = make_model()
    tr = DistoptTrainer(
        model=model,
        args=make_args(str(root / "ddp_distopt"), 2, save_strategy="no"),
        train_dataset=ds,
        optim="lamb",
        zero_stage=None,
    )
    tr.train()
    res["ddp_distopt"] = params(model)
    res["ddp_distopt_log"] = _log(tr)
    res["ddp_distopt_wrapped"] = type(tr.model_wrapped).__name__

    # (2b) losses that are means (no num_items_in_batch): DDP vs ZeRO-1, mean over micro-batches
    for key, cls, kw in (
        ("ddp_means", transformers.Trainer, {}),
        ("zero1_means", DistoptTrainer, {"optim": "lamb", "zero_stage": 1}),
    ):
        model = make_model()
        t = cls(
            model=model,
            args=make_args(str(root / key), 2, save_strategy="no"),
            train_dataset=ds,
            **kw,
        )
        t.model_accepts_loss_kwargs = False  # as for a model whose forward takes no loss kwargs
        if cls is transformers.Trainer:
            t.optimizer = distopt.optim.Lamb(_trainer_groups(t, model), lr=t.args.learning_rate)
            t.lr_scheduler = distopt.schedules.get_scheduler("cosine", t.optimizer, 1, STEPS)
        t.train()
        res[key] = params(model)
        res[f"{key}_log"] = _log(t)

    # (3) the plain Trainer with torch AdamW: an uninterrupted run whose checkpoint-2 holds a
    # classic optimizer.pt / scheduler.pt
    model = make_model()
    plain = transformers.Trainer(
        model=model, args=make_args(str(root / "plain"), 2, optim="adamw_torch"), train_dataset=ds
    )
    plain.train()
    res["plain"] = params(model)
    res["plain_log"] = _log(plain)

    # (4) DistoptTrainer ZeRO-2 with TrainingArguments.optim="adamw_torch", resumed from (3)
    model = make_model()
    tr = DistoptTrainer(
        model=model,
        args=make_args(str(root / "import"), 2, optim="adamw_torch"),
        train_dataset=ds,
        zero_stage=2,
    )
    tr.train(resume_from_checkpoint=str(root / "plain" / "checkpoint-2"))
    res["imported"] = params(model)
    res["imported_log"] = _log(tr)
    res["import_optim"] = (
        type(tr.optimizer.optimizer).__module__ + "." + type(tr.optimizer.optimizer).__name__
    )
    res["plain_at_2"] = params(
        transformers.GPT2LMHeadModel.from_pretrained(root / "plain" / "checkpoint-2")
    )

    # a checkpoint with model weights but no optimizer state is refused on every rank
    import shutil

    import torch.distributed as dist

    bare = root / "bare" / "checkpoint-2"
    if dist.get_rank() == 0:
        shutil.copytree(
            root / "plain" / "checkpoint-2",
            bare,
            ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt"),
        )
    dist.barrier()
    tr = DistoptTrainer(
        model=make_model(),
        args=make_args(str(root / "bare_run"), 2, optim="adamw_torch"),
        train_dataset=ds,
        zero_stage=2,
    )
    try:
        tr.train(resume_from_checkpoint=str(bare))
        res["bare_error"] = None
    except FileNotFoundError as exc:
        res["bare_error"] = str(exc)
    return res


def one_process_resume(root: str) -> dict:
    """In the test process itself, without a launcher (no spawn: saves a start-up of ~20 s):
    (a) ZeRO-2 over a world of one (DistoptTrainer sets the process group up), (b) no ZeRO
    (one plain process, ``zero_stage=None``) — both from the 2-rank ZeRO-2 checkpoint."""
    import torch.distributed as dist

    from distopt.integrations.transformers import DistoptTrainer

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    root = Path(root)
    out: dict = {}
    try:
        for key, stage in (("plain", None), ("zero", 2)):
            model = make_model()
            tr = DistoptTrainer(
                model=model,
                args=make_args(str(root / f"resume1_{key}"), 1),
                train_dataset=make_dataset(),
                optim="lamb",
                zero_stage=stage,
            )
            tr.train(resume_from_checkpoint=str(root / "zero2" / "checkpoint-2"))
            out[key] = params(model)
            out[f"{key}_step"] = tr.state.global_step
            out[f"{key}_world"] = dist.get_world_size() if dist.is_initialized() else 1
            out[f"{key}_log"] = _log(tr)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return out


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(
            a[n], b[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{what}: {n}: {m}"
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    two = run_distributed(two_rank_runs, 2, str(root), backend="gloo", timeout=300)
    one = one_process_resume(str(root))
    return root, two, one


def test_zero2_lamb_equals_ddp_trainer(runs):
    _, two, _ = runs
    r0, r1 = two
    assert r0["ddp_wrapped"] == "DistributedDataParallel"
    assert r0["zero2_model_is_user_module"] and r0["zero2_wrapped_is_sharded"]
    init = params(make_model())
    assert any(not torch.equal(init[n], r0["ddp"][n]) for n in init)  # it trained
    _assert_close(r0["zero2"], r0["ddp"], "ZeRO-2 vs DDP")
    _assert_close(r1["zero2"], r0["zero2"], "rank 1 vs rank 0")
    assert len(r0["zero2_log"]) == STEPS
    _assert_same_log(r0["zero2_log"], r0["ddp_log"], "ZeRO-2 vs DDP")
    assert max(g for _, _, g in r0["ddp_log"]) > 0.5  # clipping (max_grad_norm=0.5) acted
    # the rows are split between the ranks, and each holds optimizer state for its own
    (l0, total, s0), (l1, _, s1) = r0["zero2_shard"], r1["zero2_shard"]
    assert l0 + l1 == total and 0 < l0 < total and s0 > 0 and s1 > 0


def test_distopt_trainer_without_zero_equals_ddp_trainer(runs):
    r0 = runs[1][0]
    assert r0["ddp_distopt_wrapped"] == "DistributedDataParallel"
    _assert_close(r0["ddp_distopt"], r0["ddp"], "DistoptTrainer DDP vs Trainer DDP")
    _assert_same_log(r0["ddp_distopt_log"], r0["ddp_log"], "DistoptTrainer DDP vs Trainer DDP")


def test_zero1_equals_ddp_when_losses_are_means(runs):
    r0 = runs[1][0]
    _assert_close(r0["zero1_means"], r0["ddp_means"], "ZeRO-1 vs DDP (means)")
    _assert_same_log(r0["zero1_means_log"], r0["ddp_means_log"], "ZeRO-1 vs DDP (means)")
    # a mean of means is not the token mean: the two normalisations give other numbers
    assert r0["ddp_means_log"][0][1] != pytest.approx(r0["ddp_log"][0][1], rel=1e-4)


def test_checkpoint_layout_and_tied_weights(runs):
    root, _, _ = runs
    ck = root / "zero2" / "checkpoint-2"
    files = _listing(ck)
    assert "model.safetensors" in files and "distopt" in files and "trainer_state.json" in files
    assert "optimizer.pt" not in files and "scheduler.pt" not in files
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files)
    meta = (
        json.loads((ck / "distopt" / "COMMITTED").read_text())
        if (ck / "distopt" / "COMMITTED").exists()
        else None
    )
    assert meta is not None and meta["world_size"] == 2
    # the Trainer's format: from_pretrained gives the tied model the run had at step 2
    m = transformers.GPT2LMHeadModel.from_pretrained(ck)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    assert not torch.equal(m.transformer.wte.weight, make_model().transformer.wte.weight)


def test_resume_at_another_world_size_equals_uninterrupted(runs):
    _, two, one = runs
    for key in ("zero", "plain"):
        assert one[f"{key}_step"] == STEPS and one[f"{key}_world"] == 1
        _assert_close(one[key], two[0]["zero2"], f"resumed at 1 rank ({key}) vs uninterrupted at 2")
        _assert_same_log(one[f"{key}_log"], two[0]["zero2_log"], f"resumed ({key})")


def test_trainer_optimizer_pt_starts_a_sharded_run(runs):
    _, two, _ = runs
    r0 = two[0]
    assert r0["import_optim"] == "distopt.optim.adamw.AdamW"
    # torch AdamW vs distopt AdamW, and the accumulation arithmetic, differ in the last bits;
    # Adam turns that into ~1e-6 on near-zero gradients.  A fresh optimizer state (no import)
    # would be ~1e-3 off (lr 5e-3).
    for n in r0["plain"]:
        torch.testing.assert_close(r0["imported"][n], r0["plain"][n], rtol=1e-5, atol=2e-5)
    _assert_same_log(r0["imported_log"], r0["plain_log"], "imported vs plain")
    moved = max((r0["imported"][n] - r0["plain_at_2"][n]).abs().max().item() for n in r0["plain"])
    assert moved > 1e-3  # two real steps after the checkpoint


def test_checkpoint_without_optimizer_state_is_refused_on_every_rank(runs):
    _, two, _ = runs
    for r in two:
        assert r["bare_error"] is not None and "optimizer.pt" in r["bare_error"]


def test_bf16_autocast_reaches_the_forward_under_zero(tmp_path):
    """Mixed precision: Accelerate's autocast is put on the user's forward (no DDP wrap), so a
    ZeRO run computes in bf16 as the plain Trainer does."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    from distopt.integrations.transformers import DistoptTrainer

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    logs, dtypes = {}, {}
    try:
        for key, cls, kw in (
            ("plain", transformers.Trainer, {}),
            ("zero", DistoptTrainer, {"zero_stage": 2, "optim": "adamw"}),
        ):
            model = make_model()
            args = make_args(str(tmp_path / key), 1, bf16=True, save_strategy="no", max_steps=1)
            t = cls(model=model, args=args, train_dataset=make_dataset(), **kw)
            seen: list = []
            attn = model.transformer.h[0].attn.c_attn
            hook = attn.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
            t.train()
            hook.remove()
            logs[key], dtypes[key] = _log(t), set(seen)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)  # as TrainingArguments does
    assert dtypes["zero"] == dtypes["plain"] == {torch.bfloat16}
    assert logs["zero"][0][1] == pytest.approx(logs["plain"][0][1], rel=1e-6)


# --------------------------------------------------------------------------- one process, no training


@pytest.fixture(scope="module")
def trainer_one_process(tmp_path_factory):
    from distopt.integrations.transformers import DistoptTrainer

    out = tmp_path_factory.mktemp("names")
    return DistoptTrainer(
        model=make_model(),
        args=make_args(str(out), 1),
        train_dataset=make_dataset(),
        zero_stage=None,
    )


def _build(trainer, **cfg):
    import dataclasses

    trainer.distopt_config = dataclasses.replace(trainer.distopt_config, **cfg)
    trainer.optimizer = None
    return trainer.create_optimizer()


def test_every_registry_name_builds(trainer_one_process):
    from distopt.optim import list_optimizers

    tr = trainer_one_process
    n_params = len(list(tr.model.parameters()))
    for name in list_optimizers() + ["lookahead_adamw"]:
        if name == "adahessian":
            with pytest.raises(ValueError, match="create_graph"):
                _build(tr, optim=name)
            continue
        opt = _build(tr, optim=name)
        assert type(opt).__module__.startswith("distopt.optim"), name
        assert sum(len(g["params"]) for g in opt.param_groups) == n_params
        # the Trainer's grouping: no decay on biases and LayerNorms
        assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05], name
    with pytest.raises(ValueError, match="unknown optimizer 'lamb2'.*lambc"):
        _build(tr, optim="lamb2")
    opt = _build(tr, optim="lamb", optim_kwargs={"trust_clip": True, "betas": (0.8, 0.9)})
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["trust_clip"] is True


def test_groups_are_the_trainers_even_when_one_is_empty(trainer_one_process):
    # a Trainer optimizer.pt always has the two groups (decay, no decay); the import is positional
    opt = trainer_one_process._build_optimizer(torch.nn.Linear(3, 4, bias=False))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 0]


def test_training_arguments_optim_and_optim_args(trainer_one_process):
    import distopt.optim as dopt

    tr = trainer_one_process
    saved = (tr.args.optim, tr.args.optim_args)
    try:
        tr.args.optim, tr.args.optim_args = "adafactor", "clip_threshold=2.0,beta1=0.9"
        opt = _build(tr, optim=None, optim_kwargs={})
        g = opt.param_groups[0]
        assert (
            type(opt) is dopt.Adafactor
            and g["scale_parameter"] is False
            and g["relative_step"] is False
        )
        assert g["clip_threshold"] == 2.0 and g["beta1"] == 0.9 and g["lr"] == 5e-3
        tr.args.optim, tr.args.optim_args = "adamw_torch", None
        opt = _build(tr, optim=None, optim_kwargs={})
        assert type(opt) is dopt.AdamW and opt.param_groups[0]["betas"] == (0.9, 0.999)
        tr.args.optim = "lion_32bit"
        with pytest.raises(ValueError, match="no distopt equivalent.*adamw_torch"):
            _build(tr, optim=None, optim_kwargs={})
        tr.args.optim, tr.args.optim_args = "sgd", "momentum=0.5,bogus=1"
        with pytest.raises(TypeError, match="bogus"):
            _build(tr, optim=None, optim_kwargs={})
    finally:
        tr.args.optim, tr.args.optim_args = saved
        tr.distopt_config = type(tr.distopt_config)(zero_stage=None)


def test_schedule_is_distopt_and_named_by_training_arguments(trainer_one_process):
    from distopt.schedules import get_scheduler

    tr = trainer_one_process
    _build(tr, optim="adamw")
    tr.lr_scheduler = None
    sched = tr.create_scheduler(num_training_steps=10)
    assert type(sched) is type(get_scheduler("cosine", tr.optimizer, 1, 10))
    assert sched.lr_at(10) == pytest.approx(0.0, abs=1e-12) and sched.lr_at(1) == pytest.approx(
        5e-3
    )


def test_parse_optim_args_and_version_check():
    from distopt.integrations.transformers import check_transformers_version, parse_optim_args

    assert parse_optim_args("a=1, betas=(0.9,0.95),flag=true,name=x") == {
        "a": 1,
        "betas": (0.9, 0.95),
        "flag": True,
        "name": "x",
    }
    assert parse_optim_args(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_optim_args("a=1,oops")
    assert check_transformers_version() == transformers.__version__
    with pytest.raises(RuntimeError, match="tested with transformers>="):
        check_transformers_version("4.40.0")
    with pytest.raises(RuntimeError, match="DISTOPT_TRAINER_SKIP_VERSION_CHECK"):
        check_transformers_version("6.0.0")


def test_pyproject_pins_the_tested_range():
    import tomllib

    from distopt.integrations.transformers import TESTED_TRANSFORMERS

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    lo, hi = TESTED_TRANSFORMERS
    want = f"transformers>={lo.rsplit('.0', 1)[0]},<{hi.rsplit('.0', 1)[0]}"
    assert want in extras["trainer"] and want in extras["reference"], (want, extras)


def test_bad_configuration_is_refused():
    from distopt.integrations.transformers import DistoptTrainerConfig

    with pytest.raises(ValueError, match="zero_stage must be None, 1 or 2"):
        DistoptTrainerConfig(zero_stage=3)
    with pytest.raises(ValueError, match="bucket_mb"):
        DistoptTrainerConfig(bucket_mb=0)


# --------------------------------------------------------------------------- launchers (long mode)


@pytest.mark.skipif(
    not os.environ.get("DISTOPT_TRAINER_LAUNCH"),
    reason="long mode (~2 min): set DISTOPT_TRAINER_LAUNCH=1",
)
def test_launch_recipe_torchrun_then_accelerate_resume(tmp_path):
    """launch/trainer.sh: torchrun trains and checkpoints; `accelerate launch` resumes the
    checkpoint and ends on the same loss as the uninterrupted run."""
    import re
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, DISTOPT_PYTHON=sys.executable, NPROC="2", OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)
    flags = [
        "--zero",
        "2",
        "--optim",
        "lamb",
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--accum-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--n-embd",
        "32",
        "--n-layer",
        "1",
        "--log-every",
        "1",
        "--output-dir",
        str(tmp_path),
    ]

    def run(**extra: str) -> str:
        proc = subprocess.run(
            [
                "bash",
                str(root / "launch" / "trainer.sh"),
                *flags,
                *(["--resume"] if extra.get("LAUNCHER") else []),
            ],
            cwd=root,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return re.search(r"^final: .*$", proc.stdout, re.M).group(0)

    first = run()
    shutil.rmtree(tmp_path / "checkpoint-4")
    second = run(LAUNCHER="accelerate")
    assert "steps=4" in first and "steps=4" in second and "checkpoint-2" in second
    loss = re.compile(r" loss=(\S+)")
    assert loss.search(first).group(1) == loss.search(second).group(1)
