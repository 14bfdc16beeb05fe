"""Schedule-free AdamW / SGD / RAdam beyond the optimizer table (tests/cases/schedule_free.py):
train()/eval() switching, the mode in state dicts and checkpoints, errors in the wrong mode, a
resume after a save at another world size (bitwise), and transformers' Trainer by its names."""

from __future__ import annotations

import os

import pytest
import torch

import distopt.checkpoint as ckpt
import distopt.optim as do
from tests import references_schedule_free as R
from tests.dist import run_distributed
from tests.modes import build, full_params
from tests.problems import make_params, run_quadratic, uneven_batch, uneven_loss

KINDS = {
    "adamw": (do.AdamWScheduleFree, R.RefAdamWScheduleFree, "AdamWScheduleFree",
              dict(lr=1e-2, weight_decay=0.05, warmup_steps=2)),
    "sgd": (do.SGDScheduleFree, R.RefSGDScheduleFree, "SGDScheduleFree",
            dict(lr=5e-2, weight_decay=0.05, warmup_steps=2)),
    "radam": (do.RAdamScheduleFree, R.RefRAdamScheduleFree, "RAdamScheduleFree",
              dict(lr=1e-2, betas=(0.8, 0.9), silent_sgd_phase=False)),
}  # fmt: skip


def _make(kind):
    cls, _, _, kw = KINDS[kind]
    return lambda p: cls(p, **kw)


def _clone(ps):
    return [p.detach().clone() for p in ps]


def _close(a, b, what, tol=1e-5):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x.detach().float(), y.detach().float(), rtol=tol, atol=tol,
                                   msg=lambda m, i=i: f"{what}: parameter {i}: {m}")  # fmt: skip


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize("kind", list(KINDS))
def test_train_and_eval_switch_between_y_and_x(kind):
    cls, ref_cls, peer_name, kw = KINDS[kind]
    p, p_ref = make_params(), make_params()
    opt, ref = cls(p, **kw), ref_cls(p_ref, **kw)
    assert opt.train_mode is False  # a new optimizer starts in eval mode, as the reference's
    before = _clone(p)
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        run_quadratic(opt, p, 1)
    assert all(torch.equal(a, b) for a, b in zip(p, before)), "a refused step changed parameters"

    opt.train(), ref.train()
    assert opt.train_mode is True
    run_quadratic(opt, p, 7)
    run_quadratic(ref, p_ref, 7)
    _close(p, p_ref, f"{kind}: y after 7 steps")
    y = _clone(p)
    opt.eval(), ref.eval()
    assert opt.train_mode is False
    _close(p, p_ref, f"{kind}: x (the reference keeps x explicitly)")
    assert any(not torch.allclose(a, b) for a, b in zip(p, y)), "eval() did not move to x"
    x = _clone(p)
    opt.eval()  # a second eval() is a no-op
    assert all(torch.equal(a, b) for a, b in zip(p, x))
    opt.train()
    _close(p, y, f"{kind}: back to y", tol=1e-6)

    try:
        peer_mod = __import__("schedulefree")
    except ImportError:
        return
    p_peer, p2 = make_params(), make_params()
    peer, mine = getattr(peer_mod, peer_name)(p_peer, **kw), cls(p2, **kw)
    for o, ps in ((peer, p_peer), (mine, p2)):
        o.train()
        run_quadratic(o, ps, 7)
        o.eval()
    for a, b in zip(p2, p_peer):  # the same arithmetic as the published optimizer
        assert torch.equal(a, b), f"{kind}: x differs from schedulefree's"


def test_radam_silent_phase_moves_only_the_second_moment():
    """The default ``silent_sgd_phase``: no parameter change until RAdam's rectification starts
    (step 5 with beta2 = 0.999), the second moment moves; then reference and peer agree."""
    p, p_ref, p0 = make_params(), make_params(), make_params()
    opt = do.RAdamScheduleFree(p, lr=1e-2, weight_decay=0.05)
    ref = R.RefRAdamScheduleFree(p_ref, lr=1e-2, weight_decay=0.05)
    opt.train(), ref.train()
    run_quadratic(opt, p, 4)
    assert all(torch.equal(a, b) for a, b in zip(p, p0)), "a silent step moved the parameters"
    assert all(float(st["exp_avg_sq"].abs().sum()) > 0 for st in opt.state.values())
    assert opt.param_groups[0]["weight_sum"] == 0.0 and opt.param_groups[0]["lr_max"] == 0.0
    run_quadratic(opt, p, 6, start=4)
    run_quadratic(ref, p_ref, 10)
    assert any(not torch.equal(a, b) for a, b in zip(p, p0))
    _close(p, p_ref, "silent-phase RAdam vs reference")
    try:
        peer_mod = __import__("schedulefree")
    except ImportError:
        return
    p_peer = make_params()
    peer = peer_mod.RAdamScheduleFree(p_peer, lr=1e-2, weight_decay=0.05)
    peer.train()
    run_quadratic(peer, p_peer, 10)
    assert all(torch.equal(a, b) for a, b in zip(p, p_peer)), "differs from schedulefree's"


def test_low_precision_parameters_switch_in_fp32():
    p16 = make_params(dtype=torch.bfloat16)
    p32 = [torch.nn.Parameter(t.detach().float().clone()) for t in p16]
    opts = [_make("adamw")(ps) for ps in (p16, p32)]
    for o, ps in zip(opts, (p16, p32)):
        o.train()
        run_quadratic(o, ps, 5)
        o.eval()
    assert all(p.dtype == torch.bfloat16 for p in p16)
    assert all(v["z"].dtype == torch.float32 for v in opts[0].state.values())
    _close(p16, p32, "bf16 x vs fp32 x", tol=3e-2)


def test_param_group_added_later_joins_the_mode_and_options_are_checked():
    ps = make_params()
    opt = do.SGDScheduleFree(ps[:3], lr=0.1)
    opt.train()
    opt.add_param_group({"params": ps[3:]})
    assert opt.param_groups[1]["train_mode"] is True and opt.train_mode
    run_quadratic(opt, ps, 2)  # every group steps
    assert all(g["k"] == 2 for g in opt.param_groups)
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\)"):
        do.SGDScheduleFree(ps, momentum=0.0)
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \(0, 1\)"):
        do.AdamWScheduleFree(ps, betas=(0.0, 0.999))
    with pytest.raises(ValueError, match="warmup_steps"):
        do.AdamWScheduleFree(ps, warmup_steps=-1)
    with pytest.raises(TypeError, match="warmup_steps"):  # RAdam has no warmup option
        do.RAdamScheduleFree(ps, warmup_steps=10)
    names = do.list_optimizers("*schedulefree")
    assert names == ["adamw_schedulefree", "radam_schedulefree", "sgd_schedulefree"]
    opt = do.create_optimizer_v2(ps, "sgd_schedulefree", lr=0.5)
    assert isinstance(opt, do.SGDScheduleFree) and opt.param_groups[0]["momentum"] == 0.9


# --------------------------------------------------------------------------- mode in checkpoints


def _steps(model, opt, start, stop):
    """Every rank takes the whole batch: each rank's gradient is the single-process one, and
    their mean over 1, 2 or 4 ranks is exact, so runs at those world sizes are bitwise equal."""
    for t in range(start, stop):
        opt.zero_grad(set_to_none=True)
        uneven_loss(model, uneven_batch(t), t).backward()
        opt.step()


def test_mode_is_saved_restored_and_eval_mode_checkpoints_are_refused(tmp_path):
    model, opt, raw = build("single", _make("adamw"))
    opt.train()
    _steps(model, opt, 0, 3)
    opt.eval()
    x = full_params(raw)
    sd = opt.state_dict()
    assert [g["train_mode"] for g in sd["param_groups"]] == [False]
    with pytest.raises(ckpt.CheckpointError, match=r"eval mode.*optimizer\.train\(\)"):
        ckpt.save(tmp_path / "c", model=model, optimizer=opt)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()

    # state_dict records eval mode: a loaded optimizer is in eval mode and refuses to step
    model2, opt2, raw2 = build("single", _make("adamw"))
    raw2.load_state_dict(raw.state_dict())
    opt2.train()
    opt2.load_state_dict(sd)
    assert opt2.train_mode is False
    with pytest.raises(RuntimeError, match="eval mode"):
        _steps(model2, opt2, 3, 4)
    opt.train(), opt2.train()  # both put y back the same way
    assert all(torch.equal(a, b) for a, b in zip(raw.parameters(), raw2.parameters()))

    ckpt.save(tmp_path / "c", model=model, optimizer=opt)
    model3, opt3, raw3 = build("single", _make("adamw"))  # fresh: eval mode
    ckpt.load(tmp_path / "c", model=model3, optimizer=opt3)
    assert opt3.train_mode is True, "distopt.checkpoint.load did not restore train mode"
    assert opt3.param_groups[0]["k"] == 3
    for a, b in zip(raw.parameters(), raw3.parameters()):
        assert torch.equal(a, b)
    opt3.eval()
    for n, want in x.items():
        torch.testing.assert_close(full_params(raw3)[n], want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- resume across world sizes

N, K = 7, 3


def _world2(root):
    """ZeRO-2 at world 2: the uninterrupted run (y, then x), an eval-mode save (refused on every
    rank), and K steps + a save."""
    out = {}
    for kind in KINDS:
        model, opt, raw = build("zero2", _make(kind))
        opt.train()
        _steps(model, opt, 0, N)
        res = {"straight": full_params(raw)}
        opt.eval()  # each rank switches its rows; the engine all-gathers the others'
        res["x"] = full_params(raw)
        try:
            ckpt.save(f"{root}/{kind}-eval", model=model, optimizer=opt)
            res["eval_save"] = "saved"
        except ckpt.CheckpointError as exc:
            res["eval_save"] = str(exc)
        model, opt, raw = build("zero2", _make(kind))
        opt.train()
        _steps(model, opt, 0, K)
        ckpt.save(f"{root}/{kind}", model=model, optimizer=opt, extra={"step": K})
        out[kind] = res
    model, opt, raw = build("fsdp2", _make("adamw"))  # DTensor parameters: local shards switch
    opt.train()
    _steps(model, opt, 0, N)
    opt.eval()
    out["fsdp2_x"] = full_params(raw)
    return out


@pytest.mark.distributed
def test_resume_is_bitwise_after_a_save_at_another_world_size(tmp_path):
    saved = run_distributed(_world2, 2, str(tmp_path), timeout=300)
    failures = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the kernels' reduction order depends on the threads
    try:
        _compare_with_one_process(tmp_path, saved, failures)
    finally:
        torch.set_num_threads(threads)
    assert not failures, "\n".join(failures)


def _compare_with_one_process(tmp_path, saved, failures):
    for kind in KINDS:
        model, opt, raw = build("single", _make(kind))
        opt.train()
        _steps(model, opt, 0, N)
        straight = full_params(raw)
        opt.eval()
        x = full_params(raw)
        model, opt, raw = build("single", _make(kind))  # eval mode until the checkpoint says train
        assert ckpt.load(tmp_path / kind, model=model, optimizer=opt) == {"step": K}
        assert opt.train_mode, f"{kind}: mode not restored"
        _steps(model, opt, K, N)
        resumed = full_params(raw)
        opt.eval()
        resumed_x = full_params(raw)
        for r, res in enumerate(saved):
            assert "eval mode" in res[kind]["eval_save"], (
                f"{kind} rank {r}: {res[kind]['eval_save']}"
            )
            for n in straight:
                for what, a, b in (("y", res[kind]["straight"][n], straight[n]),
                                   ("x", res[kind]["x"][n], x[n])):  # fmt: skip
                    if not torch.equal(a, b):
                        failures.append(
                            f"{kind} rank {r}: world-2 {what} of {n} differs from one process"
                        )
        for n in straight:
            if not torch.equal(resumed[n], straight[n]) or not torch.equal(resumed_x[n], x[n]):
                failures.append(
                    f"{kind}: {n} after the 2 -> 1 resume differs from the uninterrupted run"
                )
            if kind == "adamw" and any(not torch.equal(res["fsdp2_x"][n], x[n]) for res in saved):
                failures.append(f"FSDP2 world 2: x of {n} differs from one process")


# --------------------------------------------------------------------------- transformers' Trainer


def _inner(opt):
    return getattr(opt, "optimizer", opt)  # Accelerate's AcceleratedOptimizer wraps ours


def test_trainer_names_train_eval_and_resume(tmp_path):
    """``TrainingArguments(optim="schedule_free_*")`` builds distopt's classes; the Trainer calls
    train() before steps and eval() for evaluation; a checkpoint taken right after an evaluation
    resumes to the uninterrupted run's weights (ZeRO-2, one process, real Trainer)."""
    transformers = pytest.importorskip("transformers")
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    from distopt.integrations.transformers import DistoptTrainer
    from tests.test_integration_trainer import make_args, make_dataset, make_model, params

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    ds = make_dataset()
    modes: list = []
    evaluated: dict = {}  # the weights each evaluation saw (x)

    class Spy(transformers.TrainerCallback):
        def on_evaluate(self, args, state, control, **kw):
            modes.append(("eval", _inner(kw["optimizer"]).train_mode))
            evaluated.setdefault(state.global_step, params(kw["model"]))

        def on_step_end(self, args, state, control, **kw):
            modes.append(("step", _inner(kw["optimizer"]).train_mode))

    def trainer(key, optim, **kw):
        args = make_args(str(tmp_path / key), 1, optim=optim, lr_scheduler_type="constant",
                         eval_strategy="steps", eval_steps=2, max_steps=4, adam_beta1=0.8,
                         warmup_steps=2, **kw)  # fmt: skip
        return DistoptTrainer(model=make_model(), args=args, train_dataset=ds, eval_dataset=ds[:4],
                              zero_stage=2, callbacks=[Spy()])  # fmt: skip

    try:
        for name, cls in (("schedule_free_sgd", do.SGDScheduleFree),
                          ("schedule_free_radam", do.RAdamScheduleFree)):  # fmt: skip
            opt = trainer(name, name, save_strategy="no").create_optimizer()
            assert type(opt) is cls, name
        tr = trainer("sf", "schedule_free_adamw")
        tr.train()
        opt = _inner(tr.optimizer)
        assert type(opt) is do.AdamWScheduleFree
        g = opt.param_groups[0]
        assert g["betas"][0] == 0.8 and g["warmup_steps"] == 2 and g["k"] == 4
        assert ("eval", False) in modes and ("step", True) in modes
        assert all(m for k, m in modes if k == "step"), modes
        straight = params(tr.model)
        eval_losses = [h["eval_loss"] for h in tr.state.log_history if "eval_loss" in h]

        again = trainer("sf_resumed", "schedule_free_adamw")
        again.train(resume_from_checkpoint=str(tmp_path / "sf" / "checkpoint-2"))
        resumed = params(again.model)
        for n, want in straight.items():
            assert torch.equal(resumed[n], want), f"{n} differs after the resume"
        again_losses = [h["eval_loss"] for h in again.state.log_history if "eval_loss" in h]
        assert again_losses[-1] == eval_losses[-1]
        assert os.path.isdir(tmp_path / "sf" / "checkpoint-2" / "distopt")
        from safetensors.torch import load_file  # the Trainer's weights: x, as evaluated

        saved = load_file(str(tmp_path / "sf" / "checkpoint-2" / "model.safetensors"))
        assert saved and all(torch.equal(t, evaluated[2][n]) for n, t in saved.items())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
