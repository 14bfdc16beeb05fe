"""``distopt bench ckpt``: checkpoint save/load time and peak memory per rank, side by side.

In one run per world size, on the same model and optimizer state:

* ``distopt``     ``distopt.shard(stage=1)`` + ``distopt.checkpoint.save`` / ``load`` (every rank
  writes and reads only its rows, in parallel);
* ``torch-zero``  ``ZeroRedundancyOptimizer``: ``consolidate_state_dict(to=0)`` + ``torch.save``
  on rank 0; load = ``torch.load`` + ``load_state_dict`` on every rank (its only way);
* ``deepspeed``   ``engine.save_checkpoint`` / ``load_checkpoint`` with ZeRO-1, when DeepSpeed is
  installed.

Peak memory is the rise of the process's resident-set high-water mark during the operation
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``; Linux only, else "n/a").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

MODES = ("distopt", "torch-zero", "deepspeed")


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

    dist.barrier()
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
    if mode == "distopt":
        opt = distopt.optim.AdamW(model.parameters(), lr=1e-3)
        model, opt = distopt.shard(model, opt, stage=1)
        engine = None
    elif mode == "torch-zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
        engine = None
    else:
        import deepspeed

        ds_cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg,
                                                 dist_init_required=False)
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
    return model, opt, engine


def _bench_mode(mode: str, cfg: dict[str, Any], device: torch.device, root: str, rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    model, opt, engine = _trained(mode, cfg, device)
    saves, loads, save_mem, load_mem = [], [], [], []
    for rep in range(cfg["repeats"]):
        path = os.path.join(root, f"{mode}-{rep}")
        if mode == "distopt":
            import distopt.checkpoint as ckpt

            def save(path=path):
                ckpt.save(path, model=model, optimizer=opt)

            def load(path=path):
                ckpt.load(path, model=model, optimizer=opt, restore_rng=False)
        elif mode == "torch-zero":
            def save(path=path):
                opt.consolidate_state_dict(to=0)
                if rank == 0:
                    os.makedirs(path, exist_ok=True)
                    torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict()},
                               os.path.join(path, "ckpt.pt"))

            def load(path=path):
                sd = torch.load(os.path.join(path, "ckpt.pt"), weights_only=False)
                model.module.load_state_dict(sd["model"])
                opt.load_state_dict(sd["optimizer"])
        else:
            def save(path=path):
                engine.save_checkpoint(path)

            def load(path=path):
                engine.load_checkpoint(path)
        dt, mem = _measure(save)
        saves.append(dt)
        save_mem.append(mem)
        dt, mem = _measure(load)
        loads.append(dt)
        load_mem.append(mem)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
    return {"save": saves, "load": loads, "save_mem": save_mem, "load_mem": load_mem}


def _worker(rank: int, world: int, store_dir: str, cfg: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed reads these
    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    device = torch.device("cpu")
    out: dict[str, Any] = {}
    root = os.path.join(store_dir, "ckpt")
    for mode in cfg["modes"]:
        out[mode] = _bench_mode(mode, cfg, device, root, rank)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        torch.save(gathered, os.path.join(store_dir, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, modes: tuple[str, ...] = MODES, repeats: int = 3, d: int = 256, layers: int = 8) -> dict[str, Any]:
    import torch.multiprocessing as mp

    modes = tuple(m for m in modes if m != "deepspeed" or _has_deepspeed())
    cfg = dict(modes=modes, repeats=repeats, d=d, layers=layers)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, tmp, cfg), nprocs=world, start_method="spawn")
        ranks = torch.load(os.path.join(tmp, "result.pt"), weights_only=False)
    from distopt.bench._gpt import TinyGPT

    n = sum(p.numel() for p in TinyGPT(d=d, layers=layers).parameters())
    res: dict[str, Any] = {"world": world, "params": n, "modes": {}}
    for m in modes:
        def worst(key, m=m):
            vals = [max((r[m][key][i] or 0) for r in ranks) for i in range(repeats)]
            return statistics.median(vals)

        res["modes"][m] = {k: worst(k) for k in ("save", "load", "save_mem", "load_mem")}
    return res


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not available here
        return False
    return True


def format_table(res: dict[str, Any], fmt: str = "text") -> str:
    base = res["modes"].get("torch-zero") or next(iter(res["modes"].values()))
    head = ["mode", "save s", "x torch-zero", "load s", "x torch-zero", "save peak MiB", "load peak MiB"]
    rows = [[m, f"{r['save']:.3f}", f"{r['save'] / base['save']:.2f}", f"{r['load']:.3f}",
             f"{r['load'] / base['load']:.2f}", f"{r['save_mem'] / 2**20:.1f}", f"{r['load_mem'] / 2**20:.1f}"]
            for m, r in res["modes"].items()]
    title = f"world size {res['world']}, AdamW, {res['params'] / 1e6:.1f}M parameters (slowest rank; peak = max over ranks)"
    if fmt == "md":
        return "\n".join([f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return "\n".join([title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
                     + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows])


def _main(args: argparse.Namespace) -> int:
    modes = tuple(args.modes.split(",")) if args.modes else MODES
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; valid: {', '.join(MODES)}")
    for w in args.world:
        print(format_table(run(w, modes, args.repeats, args.d, args.layers), args.format))
        print()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ckpt", help="checkpoint save/load time and peak memory vs torch ZeRO and DeepSpeed")
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--format", choices=["text", "md"], default="text")
    p.set_defaults(func=_main)
