"""``load_optimizer_state_dict``: state of other optimizers imported by name, continuing exactly as
the source optimizer would.

Each case trains the source for a few steps, saves its ``optimizer.state_dict()`` (a real file),
continues the source for a few more steps (the reference), and separately imports the file into
a distopt optimizer on a copy of the model as it was at the save, continues it with the same
batches, and compares the parameters:

* timm ``Lamb`` (keeps ``step`` in the param group);
* ``torch.optim.AdamW(model.parameters())`` (one group, no names) into a two-group distopt AdamW,
  with ``param_names``; without names it is refused with both structures side by side;
* a two-group distopt checkpoint consolidated by ``distopt ckpt consolidate`` (which records the
  names) into a one-group distopt optimizer;
* a HF ``Trainer`` checkpoint written by a real ``Trainer.train()`` run (``optimizer.pt`` beside
  ``model.safetensors``), imported into a distopt AdamW whose groups are in the other order.
"""

from __future__ import annotations

import pytest
import torch

import distopt
import distopt.checkpoint as ckpt
from distopt.cli import main as cli
from tests.modes import build, full_params, train_steps
from tests.references import load_timm_optim

RTOL, ATOL = 1e-5, 1e-6


def _source_then_import(tmp_path, make_source, make_target, import_kwargs=lambda model: {}):
    torch.manual_seed(0)
    model, opt, raw = build("single", make_source)
    train_steps(model, opt, 0, 3)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    snapshot = {k: v.clone() for k, v in raw.state_dict().items()}
    train_steps(model, opt, 3, 6)
    want = full_params(raw)
    model2, opt2, raw2 = build("single", make_target)
    raw2.load_state_dict(snapshot)
    sd = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    ckpt.load_optimizer_state_dict(opt2, sd, model=model2, **import_kwargs(raw2))
    train_steps(model2, opt2, 3, 6)
    return want, full_params(raw2), opt2


def _close(got, want):
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")


def test_timm_lamb(tmp_path):
    timm_lamb = load_timm_optim("lamb")
    if timm_lamb is None:
        pytest.skip("timm is not installed")
    want, got, opt2 = _source_then_import(
        tmp_path,
        lambda p: timm_lamb.Lamb(p, lr=1e-2, weight_decay=0.05),
        lambda p: distopt.optim.Lamb(p, lr=1e-2, weight_decay=0.05),
    )
    _close(got, want)
    # timm's group step (3) became each parameter's step
    sd = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert "step" in sd["param_groups"][0] and all("step" not in s for s in sd["state"].values())
    model3, opt3, _ = build("single", lambda p: distopt.optim.Lamb(p, lr=1e-2, weight_decay=0.05))
    ckpt.load_optimizer_state_dict(opt3, sd, model=model3)
    assert opt3.state and {float(s["step"]) for s in opt3.state.values()} == {3.0}


def _two_groups(p, **kw):
    ps = list(p)
    return distopt.optim.AdamW(
        [{"params": ps[:3]}, {"params": ps[3:]}], lr=1e-2, weight_decay=0.1, **kw
    )


def test_torch_adamw_one_group_into_two_groups_by_name(tmp_path):
    want, got, opt2 = _source_then_import(
        tmp_path,
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        _two_groups,
        lambda raw: {"param_names": [n for n, _ in raw.named_parameters()]},
    )
    _close(got, want)
    assert [len(g["params"]) for g in opt2.param_groups] == [3, len(want) - 3]
    # no names: the structures differ, so position is refused, showing both
    model3, opt3, _ = build("single", _two_groups)
    sd = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    with pytest.raises(ValueError, match="group structures differ") as ei:
        ckpt.load_optimizer_state_dict(opt3, sd)
    msg = str(ei.value)
    assert "state_dict" in msg and "this optimizer" in msg
    assert (
        f"group 0: {len(want)} params" in msg and "group 0: 3 params" in msg and "group 1:" in msg
    )
    # names that do not match are refused too, listing them
    names = [n for n, _ in model3.named_parameters()]
    with pytest.raises(ValueError, match="only in the state_dict .*nope"):
        ckpt.load_optimizer_state_dict(opt3, sd, model=model3, param_names=names[:-1] + ["nope"])


def test_consolidated_two_groups_into_one_group(tmp_path):
    torch.manual_seed(0)
    model, opt, raw = build("single", _two_groups)
    train_steps(model, opt, 0, 3)
    ckpt.save(tmp_path / "c", model=model, optimizer=opt)
    snapshot = {k: v.clone() for k, v in raw.state_dict().items()}
    train_steps(model, opt, 3, 6)
    want = full_params(raw)
    assert cli(["ckpt", "consolidate", str(tmp_path / "c"), str(tmp_path / "opt.pt")]) == 0
    sd = torch.load(tmp_path / "opt.pt", weights_only=False)
    assert [len(g["param_names"]) for g in sd["param_groups"]] == [3, len(want) - 3]
    model2, opt2, raw2 = build(
        "single", lambda p: distopt.optim.AdamW(p, lr=1e-2, weight_decay=0.1)
    )
    raw2.load_state_dict(snapshot)
    ckpt.load_optimizer_state_dict(opt2, tmp_path / "opt.pt", model=model2)
    train_steps(model2, opt2, 3, 6)
    _close(full_params(raw2), want)


# --------------------------------------------------------------------------- HF Trainer


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=32,
        n_positions=8,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (4, 8), generator=g) for _ in range(n)]


def _continue(model, opt, batches):
    model.train()
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_hf_trainer_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    data = [{"input_ids": ids[i], "labels": ids[i]} for ids in _batches(3) for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, save_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant", report_to=[],
        use_cpu=True, logging_strategy="no", save_only_model=False, dataloader_num_workers=0,
        seed=0,
    )  # fmt: skip
    Trainer(model=_tiny_gpt2(), args=args, train_dataset=data).train()
    folder = tmp_path / "run" / "checkpoint-3"
    assert (folder / "optimizer.pt").is_file() and (folder / "model.safetensors").is_file()

    more = _batches(3, seed=2)
    # the source continuing: torch AdamW in the Trainer's two groups, its state loaded back
    src_model = GPT2LMHeadModel.from_pretrained(folder)
    decay, no_decay = ckpt.trainer_param_names(folder, src_model)
    named = dict(src_model.named_parameters())
    src_opt = torch.optim.AdamW(
        [{"params": [named[n] for n in decay], "weight_decay": 0.1},
         {"params": [named[n] for n in no_decay], "weight_decay": 0.0}], lr=1e-2,
    )  # fmt: skip
    src_opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    want = _continue(src_model, src_opt, more)

    # distopt, groups in the other order, imported by name from the Trainer folder
    model = GPT2LMHeadModel.from_pretrained(folder)
    named = dict(model.named_parameters())
    opt = distopt.optim.AdamW(
        [{"params": [named[n] for n in no_decay], "weight_decay": 0.0},
         {"params": [named[n] for n in decay], "weight_decay": 0.0}], lr=1e-3,
    )  # fmt: skip
    ckpt.load_optimizer_state_dict(opt, folder / "optimizer.pt", model=model)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-2]
    got = _continue(model, opt, more)
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
    assert transformers.__version__
