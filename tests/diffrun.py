"""Run the programs of :mod:`tests.diffgen` under DDP, ZeRO-1, ZeRO-2 and FSDP2 and compare.

:func:`run_programs` (a ``run_distributed`` worker) runs each program in every mode and returns
the parameters after every step; :func:`check` compares them: every rank equal, every mode equal
to DDP (torch's ``DistributedDataParallel`` itself, ``find_unused_parameters=True``).
:func:`run_batch` runs many programs in one process group; :func:`long_mode` draws new seeds
until the time is up.  Command line (replay a failure, or the long mode)::

    python -m tests.diffrun --seed 123 --world 2
    python -m tests.diffrun --minutes 30
"""

from __future__ import annotations

import copy
import logging
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.diffgen import (
    BF16_MAX_ERR,
    BF16_OUTLIERS,
    BF16_TOL,
    FP32_TOL,
    NORM_RTOL,
    OVERFLOW,
    GenModel,
    Program,
    batch_for,
    describe,
    draw_program,
    finding_programs,
    fresh_state,
    regression_programs,
)

# ----------------------------------------------------------------------------- running

# (mode, action) -> (exception type, message pattern): calls distopt refuses on purpose, with a
# clear error at the call.  The program stops there in that mode (and must stop on every rank);
# a refused call that is accepted is a failure, and so is any other exception.
REFUSALS: dict[tuple[str, str], tuple[type, str]] = {}

# (mode, action) -> message pattern: calls that cannot give DDP's numbers and are not refused
# either, but log a warning (on rank 0) saying what to call instead.  The program stops there in
# that mode; a call that gives no such warning is a failure.
#   torch.nn.utils.clip_grad_norm_(model.parameters()): under ZeRO the reduced gradients live in
#   the optimizer's row shards, not in p.grad; ShardedModule.parameters() warns (issue 11 item 6).
WARNED: dict[tuple[str, str], str] = {
    ("zero1", "clip:params_torch"): r"clip_grad_norm_",
    ("zero2", "clip:params_torch"): r"clip_grad_norm_",
}


class _Capture(logging.Handler):
    """Collects distopt's warnings while a mode runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _Stop(Exception):
    """A mode stops early (a documented refusal, or an expected refusal that did not come)."""


@dataclass
class Run:
    params: list[dict] = field(default_factory=list)  # after each step: name -> flat fp32 tensor
    norms: list[tuple[int, float]] = field(default_factory=list)
    stop: str | None = None  # "refused ..." / "accepted ..."
    seconds: float = 0.0


class _Ctx:
    def __init__(self, prog: Program, mode: str, tmp: str):
        self.prog, self.mode, self.tmp = prog, mode, tmp
        self.saved: Any = None
        self.log = _Capture()
        logging.getLogger("distopt").addHandler(self.log)
        self.model, self.opt, self.raw = _build(self, prog, mode)
        self.scaler = torch.amp.GradScaler("cpu") if prog.scaler else None

    def call(self, action: str, fn):
        exp = REFUSALS.get((self.mode, action))
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised otherwise
            if exp and isinstance(exc, exp[0]) and re.search(exp[1], str(exc)):
                raise _Stop(f"refused {action}: {type(exc).__name__}: {exc}") from None
            raise
        if exp:
            raise _Stop(f"accepted {action} (expected {exp[0].__name__} matching {exp[1]!r})")
        warn = WARNED.get((self.mode, action))
        if warn:
            import torch.distributed as dist

            said = [m for m in self.log.messages if re.search(warn, m)]
            if dist.get_rank() == 0 and not said:
                raise _Stop(f"accepted {action} silently (expected a warning matching {warn!r})")
            raise _Stop(f"warned {action}" + (f": {said[0]}" if said else ""))
        return out


def make_optimizer(prog: Program, raw: nn.Module) -> torch.optim.Optimizer:
    from tests.optim_cases import CASES

    case = next(c for c in CASES if c.id == prog.case)
    params = [p for p in raw.parameters() if p.requires_grad or prog.model.frozen_in_opt]
    if not (prog.split_groups and len(params) > 1):
        return case.make(params)
    k = len(params) // 2
    opt = case.make(params[:k])
    group: dict[str, Any] = {"params": params[k:]}
    lr = opt.param_groups[0].get("lr")
    if isinstance(lr, float):
        group["lr"] = lr * 0.5
    opt.add_param_group(group)
    return opt


def _bf16_allreduce(process_group, bucket):  # no annotations: DDP inspects them
    """DDP communication hook: average the gradients in bf16 (torch's ``bf16_compress_hook``
    does the same but refuses to run without NCCL)."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    low = buf.to(torch.bfloat16).div_(dist.get_world_size(group))
    fut = dist.all_reduce(low, group=group, async_op=True).get_future()

    def back(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back)


def _build(ctx: _Ctx, prog: Program, mode: str):
    import torch.distributed as dist

    import distopt

    fsdp = mode == "fsdp2"
    raw = GenModel(prog.model, prog.seed, gate_shape=(1,) if fsdp else (), bf16_values=prog.bf16)
    if prog.bf16:
        raw.cdtype = torch.bfloat16
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(raw, find_unused_parameters=True)
        if prog.bf16:  # communicate bf16 gradients, as ZeRO does for bf16 parameters
            model.register_comm_hook(None, _bf16_allreduce)
        return model, make_optimizer(prog, raw), raw
    if mode in ("zero1", "zero2"):
        if prog.bf16:
            raw.to(torch.bfloat16)
        opt = make_optimizer(prog, raw)
        model, opt = distopt.shard(
            raw,
            opt,
            stage=int(mode[-1]),
            bucket_mb=prog.bucket_mb,
            master_dtype=torch.float32 if prog.bf16 else None,
        )
        return model, opt, raw
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if prog.bf16
        else MixedPrecisionPolicy()
    )
    fully_shard(raw, mesh=init_device_mesh("cpu", (dist.get_world_size(),)), mp_policy=mp)
    raw.set_reduce_scatter_unused_params(True)
    return raw, make_optimizer(prog, raw), raw


@contextmanager
def _no_sync(ctx: _Ctx):
    if ctx.mode == "fsdp2":
        ctx.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            ctx.model.set_requires_gradient_sync(True)
    else:
        with ctx.model.no_sync():
            yield


def _zero(ctx: _Ctx, target: str, set_to_none: bool) -> None:
    obj = {"opt": ctx.opt, "model": ctx.model, "module": ctx.raw}[target]
    ctx.call(f"zero_grad:{target}", lambda: obj.zero_grad(set_to_none=set_to_none))


def _clip(ctx: _Ctx, how: str, c: float) -> float:
    import distopt

    if how == "model":
        fn = partial(distopt.clip_grad_norm_, ctx.model, c)
    elif how == "params_distopt":
        fn = partial(distopt.clip_grad_norm_, ctx.model.parameters(), c)
    else:
        fn = partial(torch.nn.utils.clip_grad_norm_, ctx.model.parameters(), c)
    n = ctx.call(f"clip:{how}", fn)
    if type(n).__name__ == "DTensor":
        n = n.full_tensor()
    return float(n)


def _load_fresh(ctx: _Ctx, t: int, via: str) -> None:
    sd = fresh_state(ctx.prog, t, ctx.raw)
    if ctx.mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        opts = StateDictOptions(full_state_dict=True)
        fn = partial(set_model_state_dict, ctx.raw, sd, options=opts)
    elif via == "wrapper" and ctx.mode == "ddp":
        fn = partial(ctx.model.load_state_dict, {"module." + k: v for k, v in sd.items()})
    else:
        fn = partial((ctx.model if via == "wrapper" else ctx.raw).load_state_dict, sd)
    ctx.call(f"load_fresh_{via}", fn)


def _after(ctx: _Ctx, t: int, action: str) -> None:
    import distopt

    if action.startswith("load_fresh_"):
        _load_fresh(ctx, t, action.rsplit("_", 1)[1])
    elif action == "sync_lookahead":
        ctx.call(action, ctx.opt.sync_lookahead)
    elif action == "state_save":
        ctx.saved = (
            copy.deepcopy(ctx.model.state_dict()),
            copy.deepcopy(ctx.call(action, ctx.opt.state_dict)),
        )
    elif action == "state_load":
        ctx.call(action, lambda: ctx.model.load_state_dict(ctx.saved[0]))
        ctx.call(action, lambda: ctx.opt.load_state_dict(copy.deepcopy(ctx.saved[1])))
    elif action in ("ckpt_save", "ckpt_load"):
        import distopt.checkpoint as ckpt

        path = f"{ctx.tmp}/{ctx.prog.name}-{ctx.mode}"
        if action == "ckpt_save":
            ctx.call(action, lambda: ckpt.save(path, model=ctx.model, optimizer=ctx.opt))
        else:
            ctx.call(
                action,
                lambda: ckpt.load(path, model=ctx.model, optimizer=ctx.opt, restore_rng=False),
            )
    elif action == "reshard":
        opt = make_optimizer(ctx.prog, ctx.raw)
        if ctx.mode in ("zero1", "zero2"):
            ctx.model, ctx.opt = ctx.call(
                action,
                lambda: distopt.shard(
                    ctx.raw,
                    opt,
                    stage=int(ctx.mode[-1]),
                    bucket_mb=ctx.prog.bucket_mb,
                    master_dtype=torch.float32 if ctx.prog.bf16 else None,
                ),
            )
        else:
            ctx.opt = opt
    else:
        raise ValueError(f"unknown action {action!r}")


def _snapshot(raw: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in raw.named_parameters():
        t = p.full_tensor() if type(p).__name__ == "DTensor" else p
        out[n] = t.detach().float().reshape(-1).clone()
    return out


def _run_mode(prog: Program, mode: str, tmp: str, progress) -> Run:
    import torch.distributed as dist

    r = dist.get_rank()
    run = Run()
    ctx = _Ctx(prog, mode, tmp)
    try:
        for t, step in enumerate(prog.steps):
            progress(f"{prog.name} {mode} step {t}")
            if step.zero_before:
                _zero(ctx, *step.zero_before)
            for i in range(len(step.micro)):
                tok, target, route, sidx = batch_for(prog, t, i, r)
                inject = OVERFLOW if step.overflow and r == 0 and i == len(step.micro) - 1 else 0.0
                with nullcontext() if i == len(step.micro) - 1 else _no_sync(ctx):
                    out, extra = ctx.model(tok, route, sidx, step.aux, inject)
                    loss = F.cross_entropy(out.float(), target) + extra
                    (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()
            if step.skip:
                _zero(ctx, *(step.zero_after or ("opt", True)))
            else:
                if step.clip:
                    if ctx.scaler:
                        ctx.call("scaler.unscale_", lambda: ctx.scaler.unscale_(ctx.opt))
                    run.norms.append((t, _clip(ctx, *step.clip)))
                if ctx.scaler:
                    ctx.call("scaler.step", lambda: ctx.scaler.step(ctx.opt))
                    ctx.scaler.update()
                else:
                    ctx.call("step", ctx.opt.step)
                if step.zero_after:
                    _zero(ctx, *step.zero_after)
            for action in step.after:
                progress(f"{prog.name} {mode} step {t} after {action}")
                _after(ctx, t, action)
            run.params.append(_snapshot(ctx.raw))
    except _Stop as stop:
        run.stop = str(stop)
    finally:
        logging.getLogger("distopt").removeHandler(ctx.log)
    return run


def modes_of(prog: Program) -> list[str]:
    return [m for m in prog.modes if not (m == "fsdp2" and prog.fsdp2_reason())]


def run_programs(programs: list[Program], tmp: str) -> list[dict[str, Run]]:
    """``run_distributed`` worker: every program in each of its modes; results per program.

    Each finished program is also written to ``tmp`` (so a later hang or crash keeps it), and
    ``progress-<rank>.txt`` names what runs now.
    """
    import pickle

    import torch.distributed as dist

    r = dist.get_rank()

    def progress(msg: str) -> None:
        with open(f"{tmp}/progress-{r}.txt", "w") as f:
            f.write(msg)

    out = []
    for i, prog in enumerate(programs):
        res = {}
        for mode in modes_of(prog):
            t0 = time.perf_counter()
            res[mode] = _run_mode(prog, mode, tmp, progress)
            res[mode].seconds = time.perf_counter() - t0
        with open(f"{tmp}/res-{r}-{i}.pkl", "wb") as f:
            pickle.dump(res, f)
        out.append(res)
    return out


# ----------------------------------------------------------------------------- checking


def _kind(stop: str | None) -> str | None:
    """'refused clip:params_torch' of a stop message (the same on every rank)."""
    return None if stop is None else " ".join(stop.split()[:2]).rstrip(":")


def check(prog: Program, world: int, per_rank: list[dict[str, Run]]) -> list[str]:
    """Every rank equal; every mode equal to DDP after every step (first divergence reported)."""
    fails: list[str] = []
    tol = BF16_TOL if prog.bf16 else FP32_TOL
    norm_rtol = BF16_TOL["rtol"] if prog.bf16 else NORM_RTOL
    ref = per_rank[0]["ddp"]
    if ref.stop:
        return [f"the DDP reference stopped: {ref.stop}"]
    for mode in per_rank[0]:
        for r, res in enumerate(per_rank):
            run = res[mode]
            if _kind(run.stop) != _kind(per_rank[0][mode].stop):
                fails.append(
                    f"{mode}: rank {r} stopped with {run.stop!r}, rank 0 with {per_rank[0][mode].stop!r}"
                )
            if run.stop and run.stop.startswith("accepted"):
                fails.append(f"{mode} rank {r}: {run.stop}")
            for t, snap in enumerate(run.params):
                bad = [
                    n for n, v in snap.items() if not torch.equal(v, per_rank[0][mode].params[t][n])
                ]
                if bad:
                    fails.append(f"{mode} step {t}: rank {r} differs from rank 0 in {bad[:4]}")
                    break
        run = per_rank[0][mode]
        if mode == "ddp":
            continue
        if not run.stop and len(run.params) != len(ref.params):
            fails.append(f"{mode}: {len(run.params)} steps recorded, DDP {len(ref.params)}")
        for t, snap in enumerate(run.params):
            errs, outside, total = [], 0, 0
            for n, want in ref.params[t].items():
                got = snap[n]
                bad = ~torch.isclose(got, want, **tol)
                outside, total = outside + int(bad.sum()), total + bad.numel()
                if bad.any():
                    errs.append(f"{n} max abs err {float((got - want).abs().max()):.3g}")
            worst = max(
                (float((snap[n] - w).abs().max()) for n, w in ref.params[t].items()), default=0.0
            )
            if prog.bf16 and outside <= BF16_OUTLIERS * total and worst <= BF16_MAX_ERR:
                continue  # isolated bf16 rounding flips (see tests/diffgen.py)
            if errs:
                fails.append(
                    f"{mode} step {t} differs from DDP ({tol}; {outside} of {total} elements outside): "
                    + "; ".join(errs[:6])
                )
                break
        for (t, got), (t2, want) in zip(run.norms, ref.norms):
            finite = abs(want) < float("inf") and want == want
            ok = (
                (abs(got - want) <= norm_rtol * abs(want) + 1e-6)
                if finite
                else not (abs(got) < float("inf"))
            )
            if t != t2 or not ok:
                fails.append(
                    f"{mode} step {t}: clip returned norm {got:.6g}, DDP {want:.6g} (step {t2})"
                )
                break
    return fails


def _salvage(tmp: str, world: int, n: int) -> list[list[dict | None]]:
    import os
    import pickle

    out = []
    for r in range(world):
        row = []
        for i in range(n):
            path = f"{tmp}/res-{r}-{i}.pkl"
            if os.path.exists(path):
                with open(path, "rb") as f:
                    row.append(pickle.load(f))
            else:
                row.append(None)
        out.append(row)
    return out


def _run_once(programs: list[Program], world: int, timeout: float) -> tuple[list, str | None]:
    """One process group: per-rank results (None where missing) and the crash text, if any."""
    import os
    import shutil
    import tempfile

    from tests.dist import DistributedTestError, run_distributed

    tmp = tempfile.mkdtemp(prefix="distopt-diff-")
    try:
        try:
            return run_distributed(
                run_programs, world, programs, tmp, timeout=timeout, backend="gloo"
            ), None
        except DistributedTestError as exc:
            where = []
            for r in range(world):
                p = f"{tmp}/progress-{r}.txt"
                if os.path.exists(p):
                    with open(p) as f:
                        where.append(f"rank {r} was at: {f.read()}")
            crash = "\n".join(where) + "\n" + str(exc)[-6000:]
            return _salvage(tmp, world, len(programs)), crash
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_batch(
    programs: list[Program], world: int, timeout: float = 600.0, respawns: int = 4
) -> dict[str, list[str]]:
    """Run ``programs`` in one process group of ``world`` ranks; failures by program name.

    A rank that raises, dies or hangs fails the program it was running (named by the progress
    files, with the harness's traceback); the programs after it run in a new process group (at
    most ``respawns`` times), or are reported as not run.
    """
    failures: dict[str, list[str]] = {}
    todo = list(programs)
    while todo:
        per_rank, crash = _run_once(todo, world, timeout)
        for i, prog in enumerate(todo):
            recs = [per_rank[r][i] for r in range(world)]
            if all(x is not None for x in recs):
                failures[prog.name] = check(prog, world, recs)
                continue
            failures[prog.name] = [f"the process group failed while running it:\n{crash}"]
            rest = todo[i + 1 :]
            if respawns <= 0:
                for p in rest:
                    failures[p.name] = [f"not run: the process group died in program {prog.name}"]
                rest = []
            respawns -= 1
            todo = rest
            break
        else:
            todo = []
    return failures


def report(programs: list[Program], world: int, failures: dict[str, list[str]]) -> str:
    """The failed programs, each with its full description and what diverged."""
    parts = []
    for prog in programs:
        fails = failures.get(prog.name)
        if fails:
            parts.append(
                f"{describe(prog, world)}\n  FAILED at world size {world}:\n    "
                + "\n    ".join(fails)
            )
    return "\n\n".join(parts)


def signature(fail: str) -> str:
    """A failure line without its numbers (to count failures of one kind)."""
    if fail.startswith("the process group failed"):
        errs = re.findall(r"^(\w*(?:Error|Exception)[^\n]{0,120})", fail, re.M)
        return "crash: " + (errs[-1] if errs else fail.splitlines()[-1][:120])
    if "clip returned norm" in fail:
        return fail.split()[0] + " clip norm differs from DDP's"
    head = re.sub(r"\(.*", "", fail.split(":")[0])
    return re.sub(r"\b(step|rank) \d+", r"\1 N", head).strip()


def long_mode(
    minutes: float,
    worlds=(2, 3),
    first_seed: int = 100_000,
    batch: int = 8,
    log=print,
    avoid: frozenset = frozenset(),
) -> dict:
    """Draw new seeds until ``minutes`` are up; world sizes one after the other (2 processes at
    most at a time).  Returns the programs tried and failed per world size, the failure kinds
    (with a replayable seed each) and the failure reports."""
    import collections
    import time

    deadline = time.monotonic() + minutes * 60
    seed = first_seed
    tried = {w: 0 for w in worlds}
    failed = {w: 0 for w in worlds}
    kinds: collections.Counter = collections.Counter()
    example: dict[str, str] = {}
    reports: list[str] = []
    while time.monotonic() < deadline:
        progs = [draw_program(s, avoid) for s in range(seed, seed + batch)]
        seed += batch
        for w in worlds:
            fails = run_batch(progs, w, timeout=900)
            for p in progs:
                f = fails[p.name]
                if f and f[0].startswith("not run"):
                    continue
                tried[w] += 1
                if f:
                    failed[w] += 1
                    for k in {signature(x) for x in f}:
                        kinds[k] += 1
                        example.setdefault(k, f"{p.name} world {w}")
            text = report(progs, w, fails)
            if text:
                reports.append(text)
                log(text)
        log(
            f"[diffgen] seeds < {seed}: programs tried {tried}, failed {failed}, kinds {dict(kinds)}"
        )
    return {
        "tried": tried,
        "failed": failed,
        "kinds": {k: (n, example[k]) for k, n in kinds.most_common()},
        "first_seed": first_seed,
        "last_seed": seed - 1,
        "failures": reports,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(
        description="distopt differential tests: replay a seed or run the long mode"
    )
    ap.add_argument("--seed", type=int, action="append", help="replay these seeds (repeatable)")
    ap.add_argument(
        "--avoid",
        action="append",
        help="do not draw this action (zero_grad:module, clip:params_torch)",
    )
    ap.add_argument("--case", help="the optimizer case of the --seed programs (as printed)")
    ap.add_argument("--name", action="append", help="replay these fixed (regression) programs")
    ap.add_argument("--world", type=int, action="append", help="world sizes (default 2 and 3)")
    ap.add_argument("--minutes", type=float, help="long mode: draw new seeds for this long")
    ap.add_argument("--first-seed", type=int, default=100_000)
    ap.add_argument("--describe", action="store_true", help="print the programs only")
    a = ap.parse_args(argv)
    worlds = tuple(a.world or (2, 3))
    if a.minutes:
        res = long_mode(
            a.minutes,
            worlds,
            a.first_seed,
            log=lambda s: print(s, flush=True),
            avoid=frozenset(a.avoid or ()),
        )
        print(
            f"[diffgen] done: seeds {res['first_seed']}..{res['last_seed']}, programs tried per "
            f"world size {res['tried']}, failed {res['failed']}; failure kinds (count, example): "
            f"{res['kinds']}"
        )
        return 1 if res["failures"] else 0
    avoid = frozenset(a.avoid or ())
    progs = [draw_program(s, avoid, a.case) for s in (a.seed or [])]
    if a.name:
        fixed = {p.name: p for ps in regression_programs().values() for p in ps}
        fixed.update((p.name, p) for p in finding_programs())
        progs += [fixed[n] for n in a.name]
    if not progs:
        ap.error("give --seed, --name or --minutes")
    if a.describe:
        print("\n".join(describe(p) for p in progs))
        return 0
    bad = 0
    for w in worlds:
        fails = run_batch(progs, w)
        text = report(progs, w, fails)
        print(text or f"world {w}: {len(progs)} program(s) equal to DDP")
        bad += bool(text)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
