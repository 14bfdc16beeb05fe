"""``distopt bench zero --nodes 2``: data-parallel modes across two (simulated) nodes.

Two network namespaces joined by a capped veth link (:mod:`distopt.bench._netns`) play the two
nodes; ``torchrun`` runs in each, exactly as on two machines (``--nnodes 2``, c10d rendezvous at
``node0``).  In the same processes, interleaved in rounds, every mode trains the benchmark GPT:

* ``ddp``           DDP + the optimizer (the baseline: ratios are to it);
* ``zero2``         ``distopt.shard(stage=2)`` over all ranks (flat);
* ``hybrid-zero2``  ``distopt.shard(stage=2, mesh=(replicate=nodes, shard=ranks of a node))``;
* ``hsdp``          FSDP2 ``fully_shard`` on the same 2-D mesh (HSDP), distopt optimizer on it.

Reported per mode: the bytes that crossed the inter-node link per step (both directions, read
from the veth's ``tx_bytes`` counters on each node around the timed steps: what the kernel put
on the wire, headers included, not a model of it) and the median step time (slowest rank), as
ratios to DDP.  Needs root (namespaces); ``distopt bench zero`` without ``--nodes`` needs none.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distopt.bench._table import render

NODE_MODES = ("ddp", "zero2", "hybrid-zero2", "hsdp")
log = logging.getLogger("distopt.bench.nodes")


# ------------------------------------------------------------------------------ worker side


def _tx_bytes(iface: str) -> int:
    return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())


def _build(mode: str, cfg: dict[str, Any], device: torch.device, mesh: Any) -> tuple[Any, Any]:
    import distopt
    from distopt.bench._gpt import TinyGPT
    from distopt.optim import get_optimizer_class

    torch.manual_seed(0)
    model = TinyGPT(d=cfg["d_model"], layers=cfg["layers"], ctx=cfg["seq"]).to(device)
    cls = get_optimizer_class(cfg["optim"])
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return ddp, cls(ddp.parameters(), lr=1e-3)
    if mode in ("zero2", "hybrid-zero2"):
        opt = cls(model.parameters(), lr=1e-3)
        kw = {"mesh": mesh} if mode == "hybrid-zero2" else {}
        return distopt.shard(model, opt, stage=2, **kw)
    if mode == "hsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, cls(model.parameters(), lr=1e-3)
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(NODE_MODES)}")


def worker_main(cfg_path: str) -> None:
    """One rank of the two-node benchmark (run by torchrun in each namespace)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from distopt.bench._collectives import close_group
    from distopt.bench._gpt import lm_loss

    cfg = json.loads(Path(cfg_path).read_text())
    torch.set_num_threads(cfg["threads"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    iface = os.environ["DISTOPT_NODE_IFACE"]
    mesh = init_device_mesh(
        device.type, (world // local_world, local_world), mesh_dim_names=("replicate", "shard")
    )
    runs = {m: _build(m, cfg, device, mesh) for m in cfg["modes"]}
    g = torch.Generator().manual_seed(1 + rank)
    batches = [
        torch.randint(0, 256, (cfg["batch"], cfg["seq"] + 1), generator=g).to(device)
        for _ in range(4)
    ]

    def step(model: Any, opt: Any, i: int) -> None:
        opt.zero_grad(set_to_none=True)
        lm_loss(model, batches[i % len(batches)]).backward()
        opt.step()

    for model, opt in runs.values():  # warm-up: state created, buffers allocated
        for i in range(2):
            step(model, opt, i)
    times: dict[str, list[float]] = {m: [] for m in runs}
    link: dict[str, list[int]] = {m: [] for m in runs}
    for _round in range(cfg["rounds"]):
        for m, (model, opt) in runs.items():
            dist.barrier()
            if use_cuda:
                torch.cuda.synchronize()
            tx0 = _tx_bytes(iface)
            t0 = time.perf_counter()
            for i in range(cfg["steps"]):
                step(model, opt, i)
            if use_cuda:
                torch.cuda.synchronize()
            times[m].append((time.perf_counter() - t0) / cfg["steps"])
            dist.barrier()  # every rank's traffic of these steps has been sent
            link[m].append(_tx_bytes(iface) - tx0)
    params = sum(p.numel() for p in runs[cfg["modes"][0]][0].parameters())
    mine = {"times": times, "link": link, "local_rank": local_rank, "params": params}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps(gathered))
    runs.clear()
    model = opt = None  # the loops' last pair: nothing may hold the group past close_group()
    close_group()


# ------------------------------------------------------------------------------ driver side


def run(
    nproc: int = 2,
    optim: str = "adamw",
    modes: tuple[str, ...] = NODE_MODES,
    rounds: int = 3,
    steps: int = 3,
    batch: int = 8,
    seq: int = 64,
    d_model: int = 192,
    layers: int = 7,
    threads: int = 1,
    link_mbit: float | None = 1000.0,
    link_delay_ms: float | None = 0.5,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Run the modes on two simulated nodes of ``nproc`` processes; per-mode results."""
    from distopt.bench._netns import TwoNodes, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"bench zero --nodes 2 needs two network namespaces: {reason}")
    with tempfile.TemporaryDirectory() as d, TwoNodes(link_mbit, link_delay_ms) as nodes:
        out = Path(d) / "result.json"
        cfg = dict(optim=optim, modes=list(modes), rounds=rounds, steps=steps, batch=batch,
                   seq=seq, d_model=d_model, layers=layers, threads=threads, out=str(out))  # fmt: skip
        cfg_path = Path(d) / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        procs, logs = [], []
        for node in (1, 0):  # node 1 first: it waits for node 0's rendezvous store
            env = nodes.node_env(node, OMP_NUM_THREADS=str(threads))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                   "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"{nodes.hostnames[0]}:29500", "--rdzv-id", "bench",
                   "-m", "distopt.bench._nodes", str(cfg_path)]  # fmt: skip
            logf = open(Path(d) / f"node{node}.log", "w+", encoding="utf-8")  # noqa: SIM115
            logs.append(logf)
            procs.append(nodes.popen(node, cmd, env=env, stdout=logf, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        failed = [p.returncode for p in procs if p.returncode != 0]
        if failed or not out.exists():
            tails = []
            for f in logs:
                f.seek(0)
                tails.append(f.read()[-3000:])
            raise RuntimeError(
                f"bench zero --nodes 2: a node failed or hung (exit codes {[p.returncode for p in procs]}):\n"
                + "\n---\n".join(tails)
            )
        for f in logs:
            f.close()
        ranks = json.loads(out.read_text())
        shaping = nodes.shaping
    res: dict[str, Any] = {
        "nodes": 2, "nproc": nproc, "optim": optim, "params": ranks[0]["params"],
        "link": shaping, "modes": {},
    }  # fmt: skip
    node_leaders = [r for r in ranks if r["local_rank"] == 0]
    for m in modes:
        per_round_t = [max(r["times"][m][i] for r in ranks) for i in range(rounds)]
        per_round_b = [sum(r["link"][m][i] for r in node_leaders) / steps for i in range(rounds)]
        res["modes"][m] = {
            "step_s": statistics.median(per_round_t),
            "link_bytes": statistics.median(per_round_b),
        }
    return res


def format_table(result: dict[str, Any], fmt: str = "text") -> str:
    modes = result["modes"]
    base = modes.get("ddp") or next(iter(modes.values()))
    head = ["mode", "link MiB/step", "x DDP", "step ms", "x DDP"]
    rows = [
        [
            m,
            f"{r['link_bytes'] / 2**20:.2f}",
            f"{r['link_bytes'] / max(base['link_bytes'], 1):.2f}",
            f"{r['step_s'] * 1e3:.1f}",
            f"{r['step_s'] / base['step_s']:.2f}",
        ]
        for m, r in modes.items()
    ]
    title = (
        f"2 nodes x {result['nproc']} processes, {result['optim']}, "
        f"{result['params'] / 1e6:.2f}M parameters, link: {result['link']}"
    )
    return render(title, head, rows, fmt)


def main_nodes(args: argparse.Namespace) -> int:
    """``distopt bench zero --nodes 2 ...``"""
    if args.nodes != 2:
        raise ValueError(f"--nodes: only 2 simulated nodes are supported, got {args.nodes}")
    modes = tuple(args.modes.split(",")) if args.modes else NODE_MODES
    bad = [m for m in modes if m not in NODE_MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad} for --nodes; valid: {', '.join(NODE_MODES)}")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    rate = args.link_mbit if args.link_mbit and args.link_mbit > 0 else None
    res = run(args.nproc, args.optim, modes, args.rounds, args.steps, args.batch, args.seq,
              args.d_model, args.layers, args.threads, rate, args.link_delay_ms)  # fmt: skip
    print(format_table(res, args.format))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    worker_main(sys.argv[1])
