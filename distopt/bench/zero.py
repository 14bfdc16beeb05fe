"""``distopt bench zero``: sharded data-parallel training side by side, in one run per world size.

For a small GPT-like model (about 3.4M parameters, batch 8x64 tokens per rank, one thread per
rank) and one optimizer, every mode runs in the same processes, interleaved in rounds:

* ``ddp``          DDP + the optimizer unsharded (the baseline: all ratios are to it);
* ``torch-zero``   DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer`` around the same class;
* ``distopt-z1``   ``distopt.shard(stage=1)``;  ``distopt-z2``   ``distopt.shard(stage=2)``;
* ``fsdp2``        ``fully_shard`` on every block and the root, the distopt optimizer on DTensors.

Reported per mode: optimizer-state bytes on the most loaded rank, bytes each rank sends per step
under the ring model computed from the collectives *requested* at the ``torch.distributed`` API
(counted by wrapping it, see ``_collectives.py``), the median step time (forward, backward,
step; per round the slowest rank's) and the median CPU time per step and rank (the process's
CPU time, its communication threads included, averaged over the ranks).  When the ranks
outnumber the cores (4 ranks on 2 cores) the step time depends on how the scheduler interleaves
them; the CPU time is the work each mode asks of the machine, which moves far less between
rounds.  Ranks meet through a ``FileStore``; gloo on CPU, NCCL with one GPU per rank.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from distopt._dtensor import is_dtensor
from distopt.bench._table import render

MODES = ("ddp", "torch-zero", "distopt-z1", "distopt-z2", "fsdp2")


def _state_bytes(opt: Any) -> int:
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps a local optimizer
    total = 0
    for st in inner.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if is_dtensor(v) else v
                total += t.numel() * t.element_size()
    return total


def _build(mode: str, optim: str, device: torch.device, seed: int) -> tuple[Any, Any]:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    import distopt
    from distopt.bench._gpt import TinyGPT
    from distopt.optim import get_optimizer_class

    torch.manual_seed(seed)
    model = TinyGPT().to(device)
    cls = get_optimizer_class(optim)
    kw = {"lr": 1e-3}
    if mode in ("ddp", "torch-zero"):
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.register_comm_hook(None, allreduce_hook)  # routes DDP's all-reduce through dist.all_reduce
        if mode == "ddp":
            return ddp, cls(ddp.parameters(), **kw)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ddp, ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, **kw)
    if mode in ("distopt-z1", "distopt-z2"):
        opt = cls(model.parameters(), **kw)
        return distopt.shard(model, opt, stage=int(mode[-1]))
    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, cls(model.parameters(), **kw)
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def _worker(rank: int, world: int, store_dir: str, cfg: dict[str, Any]) -> None:
    import torch.distributed as dist

    from distopt.bench._collectives import close_group

    torch.set_num_threads(cfg["threads"])
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device(f"cuda:{rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world)
    mine = _measure(rank, world, device, cfg)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        torch.save({"ranks": gathered, "params": mine["params"]}, os.path.join(store_dir, "result.pt"))
    close_group()


def _measure(rank: int, world: int, device: torch.device, cfg: dict[str, Any]) -> dict[str, Any]:
    """Build every mode, time it in rounds; only plain results leave this function, so the
    models, optimizers and DDP reducers (and the process group they hold) are freed on return."""
    import torch.distributed as dist

    from distopt.bench._collectives import counting
    from distopt.bench._gpt import lm_loss
    from distopt.optim import _whole

    use_cuda = device.type == "cuda"
    with counting() as counter, _whole.counting() as whole:
        runs = {m: _build(m, cfg["optim"], device, 0) for m in cfg["modes"]}
        g = torch.Generator().manual_seed(1 + rank)
        batches = [torch.randint(0, 256, (cfg["batch"], cfg["seq"] + 1), generator=g).to(device) for _ in range(4)]

        def step(model, opt, i):
            opt.zero_grad(set_to_none=True)
            lm_loss(model, batches[i % len(batches)]).backward()
            opt.step()

        for model, opt in runs.values():  # warm-up: state created, buffers allocated
            for i in range(2):
                step(model, opt, i)
        times: dict[str, list[float]] = {m: [] for m in runs}
        cpu: dict[str, list[float]] = {m: [] for m in runs}
        traffic: dict[str, float] = {}
        # whole-tensor work (Muon's Newton-Schulz): seconds and share of the FLOPs on this rank
        ns: dict[str, list[float]] = {m: [] for m in runs}
        for _round in range(cfg["rounds"]):
            for m, (model, opt) in runs.items():
                counter.reset()
                whole.reset()
                counter.active = True
                dist.barrier()
                if use_cuda:
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(cfg["steps"]):
                    step(model, opt, i)
                if use_cuda:
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) / cfg["steps"]
                cpu[m].append((time.process_time() - c0) / cfg["steps"])
                counter.active = False
                # barrier bytes are excluded: they are issued outside the active window
                traffic[m] = counter.ring_bytes(world) / cfg["steps"]
                times[m].append(dt)
                share = whole.local_cost / whole.total_cost if whole.total_cost else 0.0
                ns[m].append((whole.local_seconds / cfg["steps"], share))
        state = {m: _state_bytes(opt) for m, (_, opt) in runs.items()}
        total_params = sum(p.numel() for p in runs[cfg["modes"][0]][0].parameters())
    return {"times": times, "cpu": cpu, "traffic": traffic, "state": state, "ns": ns, "params": total_params}


def run(world: int, optim: str = "adamw", modes: tuple[str, ...] = MODES, rounds: int = 5, steps: int = 3,
        batch: int = 8, seq: int = 64, threads: int = 1) -> dict[str, Any]:
    """Run the comparison on ``world`` local processes; returns per-mode results (rank-aggregated)."""
    import torch.multiprocessing as mp

    cfg = dict(optim=optim, modes=tuple(modes), rounds=rounds, steps=steps, batch=batch, seq=seq, threads=threads)
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, d, cfg), nprocs=world, start_method="spawn")
        res = torch.load(os.path.join(d, "result.pt"), weights_only=False)
    out: dict[str, Any] = {"world": world, "params": res["params"], "optim": optim, "modes": {}}
    for m in modes:
        # step time of a synchronous data-parallel step is that of the slowest rank
        per_round = [max(r["times"][m][i] for r in res["ranks"]) for i in range(rounds)]
        out["modes"][m] = {
            "step_s": statistics.median(per_round),
            # CPU time per step, averaged over the ranks, median over rounds
            "cpu_s": statistics.median(statistics.fmean(r["cpu"][m][i] for r in res["ranks"]) for i in range(rounds)),
            "traffic_bytes": max(r["traffic"][m] for r in res["ranks"]),
            "state_bytes": max(r["state"][m] for r in res["ranks"]),
            # Newton-Schulz (whole-tensor) seconds per step and FLOP share, busiest rank
            "ns_s": statistics.median(max(r["ns"][m][i][0] for r in res["ranks"]) for i in range(rounds)),
            "ns_share": max(r["ns"][m][0][1] for r in res["ranks"]),
        }
    return out


def format_table(result: dict[str, Any], fmt: str = "text") -> str:
    base = result["modes"]["ddp"] if "ddp" in result["modes"] else next(iter(result["modes"].values()))
    head = ["mode", "step ms", "x DDP", "CPU ms/step/rank", "x DDP", "state MiB/rank", "x DDP",
            "traffic MiB/step/rank", "x DDP"]
    rows = []
    with_ns = any(r.get("ns_s", 0.0) > 0 for r in result["modes"].values())
    if with_ns:
        head += ["NS ms/step/rank", "x DDP", "NS FLOP share"]
    for m, r in result["modes"].items():
        rows.append([
            m,
            f"{r['step_s'] * 1e3:.1f}", f"{r['step_s'] / base['step_s']:.2f}",
            f"{r['cpu_s'] * 1e3:.1f}", f"{r['cpu_s'] / max(base['cpu_s'], 1e-12):.2f}",
            f"{r['state_bytes'] / 2**20:.2f}", f"{r['state_bytes'] / max(base['state_bytes'], 1):.2f}",
            f"{r['traffic_bytes'] / 2**20:.2f}", f"{r['traffic_bytes'] / max(base['traffic_bytes'], 1):.2f}",
        ])  # fmt: skip
        if with_ns:
            rows[-1] += [f"{r['ns_s'] * 1e3:.2f}", f"{r['ns_s'] / max(base['ns_s'], 1e-12):.2f}",
                         f"{r['ns_share']:.2f}"]  # fmt: skip
    title = (f"world size {result['world']}, {result['optim']}, {result['params'] / 1e6:.2f}M parameters "
             f"(ideal state/rank = {1 / result['world']:.2f} x DDP)")
    return render(title, head, rows, fmt)


def _main(args: argparse.Namespace) -> int:
    from distopt.optim import list_optimizers

    if args.optim not in list_optimizers():
        raise ValueError(f"unknown optimizer {args.optim!r}; valid: {', '.join(list_optimizers())}")
    if args.nodes is not None:
        from distopt.bench._nodes import main_nodes

        return main_nodes(args)
    modes = tuple(args.modes.split(",")) if args.modes else MODES
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; valid: {', '.join(MODES)}")
    for w in args.world:
        if w < 1:
            raise ValueError("--world sizes must be >= 1")
        res = run(w, args.optim, modes, args.rounds, args.steps, args.batch, args.seq, args.threads)
        print(format_table(res, args.format))
        print()
        sys.stdout.flush()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zero", help="DDP vs torch ZeRO vs distopt ZeRO-1/2 vs FSDP2: step time, state, traffic "
                       "(--nodes 2: bytes over a capped link between two simulated nodes)")
    p.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes (default: 2 4)")
    p.add_argument("--optim", default="adamw", help="optimizer name (distopt list optimizers)")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--steps", type=int, default=3, help="steps per mode per round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--format", choices=["text", "md"], default="text")
    g = p.add_argument_group(
        "two simulated nodes (--nodes 2; root: network namespaces joined by a capped veth link)",
        "DDP, flat ZeRO-2, hybrid ZeRO-2 and FSDP2 HSDP: bytes over the link per step (veth "
        "counters) and step time, as ratios to DDP; --modes from ddp,zero2,hybrid-zero2,hsdp",
    )
    g.add_argument("--nodes", type=int, default=None, help="run on 2 simulated nodes")
    g.add_argument("--nproc", type=int, default=2, help="processes per node (default 2)")
    g.add_argument("--link-mbit", type=float, default=1000.0, help="link bandwidth; 0: uncapped")
    g.add_argument("--link-delay-ms", type=float, default=0.5, help="one-way latency (needs netem)")
    g.add_argument("--d-model", type=int, default=192, help="model width (default 192: 3.2M params)")
    g.add_argument("--layers", type=int, default=7, help="model depth (default 7)")
    p.set_defaults(func=_main)
