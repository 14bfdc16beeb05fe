"""``distopt bench ckpt``: checkpoint save/load time and peak memory per rank, side by side.

In one run per (model size, world size), on the same model (GPT-like, AdamW after two steps):

* ``dcp``           plain ``torch.distributed.checkpoint.save`` / ``load`` of the same state dict
                    distopt writes (model, ZeRO-1 row-sharded AdamW state), built and loaded in
                    place — the yardstick: every ratio is "x dcp";
* ``distopt``       ``distopt.shard(stage=1)`` + ``distopt.checkpoint.save`` / ``load`` (DCP
                    files of the same state, each replicated tensor written by one rank with the
                    bytes balanced over the ranks, plus RNG streams, metadata, CRC32 of every
                    byte written and read, and the commit protocol; the load reads contiguous
                    tensors' bytes straight into them instead of a ``torch.load`` per item);
* ``distopt-async`` ``save(..., async_=True)``: "save s" is the time training is blocked: until
                    ``save`` returns, plus what the next optimizer step waits for the snapshot
                    (copied in the background) after one forward/backward of the bench's
                    batch; the time until the files are committed is reported beside it;
* ``torch-save``    ``torch.save`` of the consolidated state (full model + torch AdamW state
                    dict, already on rank 0) by rank 0; load = ``torch.load`` + ``load_state_dict``
                    on every rank — the cost of the bytes alone, without any consolidation;
* ``torch-zero``    ``ZeroRedundancyOptimizer``: ``consolidate_state_dict(to=0)`` + ``torch.save``
                    on rank 0; load = ``torch.load`` + ``load_state_dict`` on every rank;
* ``deepspeed``     ``engine.save_checkpoint`` / ``load_checkpoint`` with ZeRO-1, when DeepSpeed is
                    installed.

``dcp``, ``distopt`` and ``distopt-async`` share one model and alternate within every repeat,
each repeat starting with the next of them (no mode always runs first or after the same one),
so their ratios come from the same conditions.  Every mode runs one untimed warm-up save and
load first, and every operation starts from a collected heap (``gc.collect()`` before it, so
that no mode pays a full collection of the others' garbage in its timed window; distopt pauses
the collector during a synchronous save or load, plain DCP leaves it on).  Times are the slowest
rank's, median over repeats.  Peak memory is the rise of the
process's resident-set high-water mark during the operation (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``; Linux only, else "n/a").
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

from distopt.bench._table import render

MODES = ("dcp", "distopt", "distopt-async", "torch-save", "torch-zero", "deepspeed")
SIZES = {"tiny": (64, 2), "25m": (512, 8), "100m": (1024, 8)}  # (width, layers) of TinyGPT
_SHARED = ("dcp", "distopt", "distopt-async")


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(fn) -> tuple[float, float | None]:
    import torch.distributed as dist

    gc.collect()  # every operation starts from a collected heap: no mode inherits another's
    dist.barrier()  # garbage and pays a full collection in its timed window by luck
    ok = _reset_peak()
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    dt = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    rise = (peak - before) * 1024 if ok and peak is not None and before is not None else None
    return dt, rise


def _trained(mode: str, cfg: dict[str, Any], device: torch.device):
    import torch.distributed as dist

    import distopt
    from distopt.bench._gpt import TinyGPT, lm_loss

    torch.manual_seed(0)
    model = TinyGPT(d=cfg["d"], layers=cfg["layers"]).to(device)
    idx = torch.randint(0, 256, (2, 17), device=device)
    engine = None
    if mode in _SHARED:
        opt = distopt.optim.AdamW(model.parameters(), lr=1e-3)
        model, opt = distopt.shard(model, opt, stage=1)
    elif mode == "torch-save":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif mode == "torch-zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        opt = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3
        )
    else:
        import deepspeed

        ds_cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}  # fmt: skip
        engine, opt, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=ds_cfg,
            dist_init_required=False,
        )
        model = engine
    for _ in range(2):
        loss = lm_loss(model, idx)
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()
    dist.barrier()

    def forward_backward() -> None:  # training work that does not write parameters or state
        lm_loss(model, idx).backward()

    return model, opt, engine, forward_backward


def _dcp_state(model: Any, opt: Any) -> dict[str, Any]:
    """The state dict distopt hands to DCP (same keys, same row-sharded tensors), in place."""
    from distopt.checkpoint._save import _collect, _materialize

    specs = _collect(model, opt)[0]
    return _materialize(specs, copy=False)


def _ops(
    mode: str, model: Any, opt: Any, engine: Any, rank: int, forward_backward: Any = None
) -> dict[str, Any]:
    """{"save": fn(path), "load": fn(path), ["wait": fn(), "next_step_wait": fn() -> s]}."""
    import torch.distributed.checkpoint as dcp

    import distopt.checkpoint as ckpt

    if mode == "dcp":
        return {"save": lambda p: dcp.save(_dcp_state(model, opt), checkpoint_id=p),
                "load": lambda p: dcp.load(_dcp_state(model, opt), checkpoint_id=p)}  # fmt: skip
    if mode == "distopt":
        return {"save": lambda p: ckpt.save(p, model=model, optimizer=opt),
                "load": lambda p: ckpt.load(p, model=model, optimizer=opt, restore_rng=False)}  # fmt: skip
    if mode == "distopt-async":

        def next_step_wait() -> float:
            # what the next optimizer step's pre-hook waits for the snapshot, after the
            # forward/backward that precedes it (neither writes parameters or state)
            forward_backward()
            t0 = time.perf_counter()
            ckpt.wait_snapshot()
            return time.perf_counter() - t0

        return {"save": lambda p: ckpt.save(p, model=model, optimizer=opt, async_=True), "wait": ckpt.wait,
                "next_step_wait": next_step_wait,
                "load": lambda p: ckpt.load(p, model=model, optimizer=opt, restore_rng=False)}  # fmt: skip
    if mode == "torch-save":

        def save(p):
            if rank == 0:
                os.makedirs(p, exist_ok=True)
                torch.save(
                    {"model": model.state_dict(), "optimizer": opt.state_dict()},
                    os.path.join(p, "ckpt.pt"),
                )

        def load(p):
            sd = torch.load(os.path.join(p, "ckpt.pt"), weights_only=False)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optimizer"])

        return {"save": save, "load": load}
    if mode == "torch-zero":

        def save(p):
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                os.makedirs(p, exist_ok=True)
                torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict()},
                           os.path.join(p, "ckpt.pt"))  # fmt: skip

        def load(p):
            sd = torch.load(os.path.join(p, "ckpt.pt"), weights_only=False)
            model.module.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optimizer"])

        return {"save": save, "load": load}
    return {
        "save": lambda p: engine.save_checkpoint(p),
        "load": lambda p: engine.load_checkpoint(p),
    }


def _run_group(
    group: tuple[str, ...], cfg: dict[str, Any], device: torch.device, root: str, rank: int
) -> dict:
    import torch.distributed as dist

    model, opt, engine, fwd_bwd = _trained(group[0], cfg, device)
    ops = {m: _ops(m, model, opt, engine, rank, fwd_bwd) for m in group}
    keys = ("save", "load", "save_mem", "load_mem", "done", "returned", "step_wait")
    out = {m: {k: [] for k in keys} for m in group}
    for rep in range(-cfg["warmup"], cfg["repeats"]):
        paths = {m: os.path.join(root, f"{m}-{rep}") for m in group}
        k = rep % len(group)
        order = group[k:] + group[:k]  # each repeat starts with the next mode
        for m in order:  # saves, alternating between the modes that share the model
            dt, mem = _measure(lambda m=m, paths=paths: ops[m]["save"](paths[m]))
            returned, step_wait, done = dt, 0.0, dt
            if "wait" in ops[m]:
                t0 = time.perf_counter()
                step_wait = ops[m]["next_step_wait"]()
                ops[m]["wait"]()
                dist.barrier()
                done = dt + time.perf_counter() - t0
            if rep >= 0:
                out[m]["save"].append(returned + step_wait)
                out[m]["returned"].append(returned)
                out[m]["step_wait"].append(step_wait)
                out[m]["save_mem"].append(mem)
                out[m]["done"].append(done)
        for m in order:
            dt, mem = _measure(lambda m=m, paths=paths: ops[m]["load"](paths[m]))
            if rep >= 0:
                out[m]["load"].append(dt)
                out[m]["load_mem"].append(mem)
        dist.barrier()
        if rank == 0:
            for p in paths.values():
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()
    return out


def _worker(rank: int, world: int, store_dir: str, cfg: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world)
    )  # DeepSpeed reads these
    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    device = torch.device("cpu")
    out: dict[str, Any] = {}
    shared = tuple(m for m in cfg["modes"] if m in _SHARED)
    groups = ([shared] if shared else []) + [(m,) for m in cfg["modes"] if m not in _SHARED]
    for group in groups:
        out.update(_run_group(group, cfg, device, cfg["root"], rank))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        torch.save(gathered, os.path.join(store_dir, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _fs_of(path: str) -> str:
    """The file system type holding ``path`` (from /proc/mounts), for the table's title."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if os.path.realpath(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def run(
    world: int,
    modes: tuple[str, ...] = MODES,
    repeats: int = 3,
    d: int = 512,
    layers: int = 8,
    warmup: int = 1,
    directory: str | None = None,
) -> dict[str, Any]:
    """Run one table: ``world`` ranks, a TinyGPT of width ``d`` and ``layers`` blocks."""
    import torch.multiprocessing as mp

    modes = tuple(m for m in modes if m != "deepspeed" or _has_deepspeed())
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=directory) as root:
        cfg = dict(modes=modes, repeats=repeats, d=d, layers=layers, warmup=warmup, root=root)
        mp.start_processes(_worker, args=(world, tmp, cfg), nprocs=world, start_method="spawn")
        ranks = torch.load(os.path.join(tmp, "result.pt"), weights_only=False)
        fs = _fs_of(root)
    from distopt.bench._gpt import TinyGPT

    n = sum(p.numel() for p in TinyGPT(d=d, layers=layers).parameters())
    from distopt.checkpoint._storage import CRC_IMPL

    res: dict[str, Any] = {"world": world, "params": n, "fs": fs, "modes": {}, "crc": CRC_IMPL}
    for m in modes:

        def worst(key, m=m):
            vals = [max((r[m][key][i] or 0) for r in ranks) for i in range(repeats)]
            return statistics.median(vals)

        keys = ("save", "load", "save_mem", "load_mem", "done", "returned", "step_wait")
        res["modes"][m] = {k: worst(k) for k in keys}
    return res


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not available here
        return False
    return True


def format_table(res: dict[str, Any], fmt: str = "text") -> str:
    modes = res["modes"]
    base = modes.get("dcp") or next(iter(modes.values()))
    base_name = "dcp" if "dcp" in modes else next(iter(modes))
    head = [
        "mode",
        "save s",
        f"x {base_name}",
        "load s",
        f"x {base_name}",
        "save peak MiB",
        "load peak MiB",
    ]
    rows = []
    for m, r in modes.items():
        rows.append([m, f"{r['save']:.3f}", f"{r['save'] / base['save']:.2f}", f"{r['load']:.3f}",
                     f"{r['load'] / base['load']:.2f}", f"{r['save_mem'] / 2**20:.1f}",
                     f"{r['load_mem'] / 2**20:.1f}"])  # fmt: skip
    title = (f"world size {res['world']}, AdamW, {res['params'] / 1e6:.1f}M parameters, {res['fs']} "
             f"(slowest rank; peak = max over ranks)")  # fmt: skip
    notes = []
    if "distopt-async" in modes and "distopt" in modes:
        a, s = modes["distopt-async"], modes["distopt"]
        notes.append(f"distopt-async: training blocked {a['save']:.3f} s per save = "
                     f"{a['save'] / s['save']:.1%} of a synchronous distopt save (save returned "
                     f"after {a['returned']:.3f} s, the next step waited {a['step_wait']:.3f} s "
                     f"for the snapshot after one forward/backward; files committed after "
                     f"{a['done']:.3f} s)")  # fmt: skip
    if "crc" in res and any(m.startswith("distopt") for m in modes):
        notes.append(f"distopt's CRC32: {res['crc']}")
    return render(title, head, rows, fmt, notes)


def _main(args: argparse.Namespace) -> int:
    modes = tuple(args.modes.split(",")) if args.modes else MODES
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; valid: {', '.join(MODES)}")
    if args.d is not None or args.layers is not None:
        shapes = [(args.d or 512, args.layers or 8)]
    else:
        shapes = [SIZES[s] for s in args.size]
    for d, layers in shapes:
        for w in args.world:
            res = run(w, modes, args.repeats, d, layers, args.warmup, args.dir)
            print(format_table(res, args.format))
            print(flush=True)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ckpt", help="checkpoint save/load time and peak memory vs plain DCP, torch, DeepSpeed"
    )
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument(
        "--size",
        nargs="+",
        choices=sorted(SIZES),
        default=["25m", "100m"],
        help="model sizes (TinyGPT width x layers: tiny 64x2, 25m 512x8, 100m 1024x8)",
    )
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed save+load rounds first (default 1)"
    )
    p.add_argument("--d", type=int, default=None, help="model width (overrides --size)")
    p.add_argument("--layers", type=int, default=None, help="model blocks (overrides --size)")
    p.add_argument(
        "--dir", default=None, help="where to write the checkpoints (default: the system temp dir)"
    )
    p.add_argument("--format", choices=["text", "md"], default="text")
    p.set_defaults(func=_main)
