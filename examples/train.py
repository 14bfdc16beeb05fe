"""Train a small character-level transformer LM with distopt optimizers and schedules.

One process:          python examples/train.py --max-steps 200
Several processes:    torchrun --nproc-per-node 2 examples/train.py --max-steps 200
                      (or: bash launch/train.sh --max-steps 200)

Runs on CPU with gloo when there is no GPU, else with NCCL and one GPU per process
(LOCAL_RANK).  Gradients are synchronised with DDP by default, with distopt's ZeRO
(``--zero 1|2``) or with FSDP2 (``--fsdp``).  Rank 0 shows progress and prints a final line

    final: steps=200 loss=1.234 first_loss=4.170 tokens/s=12345 time=12.3s
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lm import DEFAULT_CORPUS, CharData, ModelConfig, TinyGPT  # noqa: E402

log = logging.getLogger("train")


# ------------------------------------------------------------------ distopt feature detection
# Parts of distopt land at different times; the example checks what this checkout has and
# turns flags that need a missing part into a clear command-line error.


def _distopt_attr(module: str, name: str):
    """``module.name`` if importable, else None."""
    try:
        mod = __import__(module, fromlist=[name])
    except ImportError:
        return None
    return getattr(mod, name, None)


def distopt_features() -> dict[str, object]:
    return {
        "create_optimizer_v2": _distopt_attr("distopt.optim", "create_optimizer_v2"),
        "get_optimizer_class": _distopt_attr("distopt.optim", "get_optimizer_class"),
        "get_scheduler": _distopt_attr("distopt.schedules", "get_scheduler"),
        "SchedulerType": _distopt_attr("distopt.schedules", "SchedulerType"),
        "shard": _distopt_attr("distopt", "shard"),
        "clip_grad_norm_": _distopt_attr("distopt", "clip_grad_norm_"),
        "GradientAccumulator": _distopt_attr("distopt", "GradientAccumulator"),
        "checkpoint_save": _distopt_attr("distopt.checkpoint", "save"),
        "checkpoint_load": _distopt_attr("distopt.checkpoint", "load"),
    }


def _shard_takes_mesh(feat: dict) -> bool:
    import inspect

    return "mesh" in inspect.signature(feat["shard"]).parameters


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    return fully_shard


# ------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a small character-level transformer LM (distopt example).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--optim", default="adamw", help="distopt optimizer name (distopt list)")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--schedule", default="cosine", help="distopt schedule name")
    g.add_argument("--warmup-steps", type=int, default=20)
    g.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip; 0: off")
    g = p.add_argument_group("data and model")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per rank per micro-step")
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--accum-steps", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--data", type=Path, default=DEFAULT_CORPUS, help="text corpus")
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g = p.add_argument_group("distribution")
    g.add_argument(
        "--zero", type=int, choices=(0, 1, 2), default=0, help="distopt ZeRO stage (0: plain DDP)"
    )
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2")
    g.add_argument(
        "--hybrid", action="store_true",
        help="with --zero or --fsdp: shard within each node, replicate across nodes "
        "(a 2-D replicate x shard mesh; only each rank's shard crosses the inter-node link)",
    )
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-dir", type=Path, default=None)
    g.add_argument("--save-every", type=int, default=0, help="steps between saves; 0: at end only")
    g.add_argument(
        "--resume", action="store_true",
        help="resume from the newest complete checkpoint in --save-dir (a fresh start if none)",
    )
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep (default 3)")
    g.add_argument("--final-state", type=Path, default=None,
                   help="write the final model state_dict here (rank 0)")
    g.add_argument("--crash-at-step", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--crash-rank", type=int, default=1, help=argparse.SUPPRESS)
    g = p.add_argument_group("misc")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument(
        "--sample", type=int, default=0, metavar="N", help="print N sampled characters at the end"
    )
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a tqdm bar")
    g.add_argument(
        "--step-stats", type=Path, default=None, metavar="PATH",
        help="append a JSON line per step (step, seconds, bytes this node sent on each "
        "non-loopback network interface) to PATH.node<N>, from the first process of each node",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args, distopt_features())
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace, feat: dict) -> None:
    """Reject bad values and flags this checkout cannot honour, with one-line messages."""
    for name, low in (
        ("max_steps", 1),
        ("batch_size", 1),
        ("seq_len", 2),
        ("accum_steps", 1),
        ("log_every", 1),
        ("warmup_steps", 0),
        ("save_every", 0),
        ("sample", 0),
        ("d_model", 1),
        ("n_layer", 1),
        ("n_head", 1),
    ):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not (args.clip_grad >= 0 and math.isfinite(args.clip_grad)):
        parser.error(f"--clip-grad must be >= 0, got {args.clip_grad}")
    if args.d_model % args.n_head:
        parser.error(f"--d-model {args.d_model} must be divisible by --n-head {args.n_head}")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    # Optimizer name.
    if feat["get_optimizer_class"] is not None:
        try:
            feat["get_optimizer_class"](args.optim)
        except ValueError as exc:
            parser.error(f"--optim {args.optim}: {exc}")
    elif args.optim != "adamw":
        # FALLBACK(distopt.optim missing): delete with the fallback in build_optimizer.
        parser.error(
            f"--optim {args.optim} needs distopt.optim, which this checkout lacks "
            "(only adamw works, through torch.optim.AdamW)"
        )

    # Schedule name.
    if feat["SchedulerType"] is not None:
        try:
            feat["SchedulerType"](args.schedule)
        except ValueError:
            parser.error(
                f"--schedule {args.schedule}: unknown schedule; valid: "
                + ", ".join(t.value for t in feat["SchedulerType"])
            )
        if args.schedule == "reduce_lr_on_plateau":
            parser.error(
                "--schedule reduce_lr_on_plateau needs a validation metric, which "
                "this example does not compute"
            )

    # Sharding.
    if args.fsdp and args.zero:
        parser.error(
            "--fsdp and --zero are alternatives (FSDP2 shards parameters, gradients "
            "and optimizer state itself); use one"
        )
    if args.hybrid and not (args.zero or args.fsdp):
        parser.error("--hybrid needs --zero 1|2 or --fsdp (it chooses how they shard)")
    if args.hybrid and args.zero and feat["shard"] is not None and not _shard_takes_mesh(feat):
        parser.error("--hybrid --zero needs distopt.shard(mesh=...), which this checkout lacks")
    if args.zero and feat["shard"] is None:
        parser.error(f"--zero {args.zero} needs distopt.shard, which this checkout lacks")
    if args.zero and feat["create_optimizer_v2"] is None:
        parser.error("--zero needs a distopt optimizer (distopt.optim is missing)")
    if args.fsdp and _fully_shard() is None:
        parser.error(
            f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); "
            f"this is torch {torch.__version__}"
        )

    # Accumulation and checkpoints.
    if args.accum_steps > 1 and feat["GradientAccumulator"] is None:
        parser.error(
            f"--accum-steps {args.accum_steps} needs distopt.GradientAccumulator, "
            "which this checkout lacks (use --accum-steps 1)"
        )
    if (args.save_every or args.resume) and args.save_dir is None:
        parser.error("--save-every and --resume need --save-dir")
    if args.save_dir is not None and (
        feat["checkpoint_save"] is None or feat["checkpoint_load"] is None
    ):
        parser.error(
            "--save-dir/--resume need distopt.checkpoint.save/load, which this checkout lacks"
        )


# ------------------------------------------------------------------------------- set-up


class Dist:
    """Who we are: rank, world size, local rank, device; whether a process group exists."""

    def __init__(self, rank=0, world_size=1, local_rank=0, device=None, initialized=False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cpu")
        self.initialized = initialized

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(args: argparse.Namespace) -> Dist:
    """Join the torchrun job if there is one; give --zero/--fsdp a 1-rank group otherwise."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it to 1; respect a user's value
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = "nccl" if use_cuda else "gloo"
    initialized = False
    if under_torchrun:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart > 0:
            # After a restart, torchrun's workers can meet stale peer addresses of the previous
            # attempt in the shared store (pytorch#167288: "Connection refused"); give this
            # attempt's process group a key space of its own.
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
                wait_for_workers=False,
            )
            store = dist.PrefixStore(f"distopt/attempt-{restart}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        initialized = True
    elif args.zero or args.fsdp:
        # One process, but sharding code wants a process group: a world of one.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        initialized = True
    return Dist(rank, world_size, local_rank, device, initialized)


def setup_logging(d: Dist) -> None:
    logging.basicConfig(
        level=logging.INFO if d.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def build_model(args: argparse.Namespace, vocab_size: int, d: Dist) -> TinyGPT:
    torch.manual_seed(args.seed)  # same initial weights on every rank
    cfg = ModelConfig(
        vocab_size=vocab_size,
        seq_len=args.seq_len,
        d_model=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
    )
    return TinyGPT(cfg).to(d.device)


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, feat: dict):
    create = feat["create_optimizer_v2"]
    if create is not None:
        return create(model, opt=args.optim, lr=args.lr, weight_decay=args.weight_decay)
    # FALLBACK(distopt.optim missing): delete once distopt.optim has landed.
    log.warning("FALLBACK: distopt.optim is missing; using torch.optim.AdamW")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
    )


def _constant_factor(_step: int) -> float:  # FALLBACK(distopt.schedules missing)
    return 1.0


def build_scheduler(args: argparse.Namespace, optimizer, feat: dict):
    get = feat["get_scheduler"]
    if get is not None:
        return get(
            args.schedule,
            optimizer,
            num_warmup_steps=args.warmup_steps,
            num_training_steps=args.max_steps,
        )
    # FALLBACK(distopt.schedules missing): delete once distopt.schedules has landed.
    log.warning(
        "FALLBACK: distopt.schedules is missing; using a constant lr, not %s", args.schedule
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant_factor)


def wrap_model(args: argparse.Namespace, model: torch.nn.Module, d: Dist, feat: dict):
    """Returns ``(model_for_training, optimizer)``; the optimizer is built here because FSDP2
    must shard the parameters before the optimizer sees them and ZeRO needs it to shard."""
    mesh = hybrid_mesh(d) if args.hybrid else None
    if args.fsdp:
        fully_shard = _fully_shard()
        kw = {} if mesh is None else {"mesh": mesh}  # a 2-D mesh: FSDP2's HSDP
        for block in model.blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model, build_optimizer(args, model, feat)
    optimizer = build_optimizer(args, model, feat)
    if args.zero:
        kw = {} if mesh is None else {"mesh": mesh}
        return feat["shard"](model, optimizer, stage=args.zero, **kw)
    if d.initialized and d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
        return ddp, optimizer
    return model, optimizer


def hybrid_mesh(d: Dist):
    """A (replicate, shard) DeviceMesh: shard over the processes of a node, replicate across
    nodes (torchrun numbers the ranks of a node contiguously)."""
    from torch.distributed.device_mesh import init_device_mesh

    local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    if d.world_size % local:
        raise SystemExit(
            f"--hybrid: world size {d.world_size} is not a multiple of the processes per node "
            f"({local}); every node must run the same number of processes"
        )
    return init_device_mesh(
        d.device.type, (d.world_size // local, local), mesh_dim_names=("replicate", "shard")
    )


class StepStats:
    """--step-stats: per step wall time and this node's network bytes sent, as JSON lines."""

    def __init__(self, path: Path | None, d: Dist):
        self.file = None
        if path is None or int(os.environ.get("LOCAL_RANK", 0)) != 0:
            return
        node = int(os.environ.get("GROUP_RANK", 0))
        self.file = open(f"{path}.node{node}", "a", encoding="utf-8")  # noqa: SIM115
        self.d = d
        self.t = time.perf_counter()

    @staticmethod
    def _tx_bytes() -> dict[str, int]:
        out = {}
        for dev in sorted(Path("/sys/class/net").glob("*")):
            if dev.name == "lo":
                continue
            with contextlib.suppress(OSError, ValueError):
                out[dev.name] = int((dev / "statistics" / "tx_bytes").read_text())
        return out

    def record(self, step: int) -> None:
        if self.file is None:
            return
        import json

        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        rec = {"step": step, "seconds": now - self.t, "tx_bytes": self._tx_bytes()}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.t = now


def clip_gradients(args: argparse.Namespace, model: torch.nn.Module, feat: dict) -> None:
    if not args.clip_grad:
        return
    if feat["clip_grad_norm_"] is not None:
        feat["clip_grad_norm_"](model, args.clip_grad)  # also right for ZeRO and FSDP2 shards
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)


def make_accumulator(args: argparse.Namespace, model: torch.nn.Module, feat: dict):
    """None for one micro-step per optimizer step, else a ``distopt.GradientAccumulator``:
    no gradient sync off the boundary, the loss normalised by the window's global token count.
    """
    if args.accum_steps == 1:
        return None
    return feat["GradientAccumulator"](model, steps=args.accum_steps)


# ------------------------------------------------------------------------- checkpoints
# distopt.checkpoint.CheckpointManager: step-N folders, atomic commit, rotation, and a
# ``latest()`` that ignores a save interrupted by a crash.  The data position is the step
# itself (batches are a pure function of the step), so ``extra`` needs only the step.


def _manager(args):
    from distopt.checkpoint import CheckpointManager

    return CheckpointManager(args.save_dir, keep_last=args.keep_last)


def save_checkpoint(args, step, model, optimizer, scheduler, accumulator, feat) -> None:
    path = _manager(args).save(
        step, model=model, optimizer=optimizer, scheduler=scheduler, accumulator=accumulator,
        extra={"step": step},
    )
    log.info("saved checkpoint %s", path)


def maybe_resume(args, model, optimizer, scheduler, accumulator, feat) -> int:
    """Step to start from (0 without --resume or without a checkpoint yet)."""
    if not args.resume:
        return 0
    mgr = _manager(args)
    path = mgr.latest()
    if path is None:
        log.info("no checkpoint in %s yet; starting from scratch", args.save_dir)
        return 0
    extra = feat["checkpoint_load"](
        path, model=model, optimizer=optimizer, scheduler=scheduler, accumulator=accumulator
    )
    step = int(extra["step"])
    log.info("resumed from %s at step %d", path, step)
    return step


def write_final_state(path: Path, model: torch.nn.Module, d) -> None:
    """Rank 0 writes {name: full tensor} (collective: FSDP2 shards are gathered)."""
    inner = getattr(model, "module", model)
    full = {}
    for name, p in inner.named_parameters():
        t = p.full_tensor() if type(p).__name__ == "DTensor" else p
        full[name] = t.detach().cpu().clone()
    if d.is_main:
        torch.save(full, path)


def maybe_crash(args, step: int, d) -> None:
    """--crash-at-step (fault-tolerance testing): SIGKILL this rank once, at the start of ``step``."""
    if args.crash_at_step is None or step != args.crash_at_step or d.rank != args.crash_rank:
        return
    marker = (args.save_dir or Path(".")) / f".crashed-at-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    log.warning("rank %d: --crash-at-step %d: killing myself", d.rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------- training


def mean_across_ranks(values: list[float], d: Dist, device) -> list[float]:
    t = torch.tensor(
        values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device
    )
    if d.initialized and d.world_size > 1:
        dist.all_reduce(t)
        t /= d.world_size
    return t.tolist()


def train_step(args, step, model, optimizer, scheduler, data, accumulator, d, feat) -> float:
    """One optimizer step over ``accum_steps`` micro-batches; returns this rank's mean loss."""
    total = 0.0
    for micro in range(args.accum_steps):
        x, y = data.batch(
            step,
            args.batch_size,
            args.seq_len,
            d.rank,
            d.world_size,
            seed=args.seed,
            micro_step=micro,
            device=d.device,
        )
        ntok = y.numel()  # target tokens of this micro-batch
        ctx = accumulator.accumulate(num_items=ntok) if accumulator is not None else contextlib.nullcontext()
        with ctx:
            loss = model(x, y)  # mean over the micro-batch's target tokens
            if accumulator is not None:
                accumulator.backward(loss * ntok)  # the SUM; normalised over the whole window
            else:
                loss.backward()
        total += loss.item()
    assert accumulator is None or accumulator.sync_gradients
    clip_gradients(args, model, feat)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)  # a ZeRO ShardedModule also clears its gradient shards
    return total / args.accum_steps


class Progress:
    """tqdm bar on an interactive rank 0 (when installed), else a log line every N steps."""

    def __init__(self, args, d: Dist, start_step: int):
        self.args, self.d = args, d
        self.bar = None
        if d.is_main and not args.no_progress and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(
                    total=args.max_steps,
                    initial=start_step,
                    unit="step",
                    dynamic_ncols=True,
                    mininterval=0.5,
                )

    def update(self, step: int, loss: float, tok_s: float, lr: float) -> None:
        if not self.d.is_main:
            return
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}", refresh=False
            )
        else:
            log.info(
                "step %d/%d loss %.4f lr %.3e tokens/s %.0f",
                step,
                self.args.max_steps,
                loss,
                lr,
                tok_s,
            )

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(args: argparse.Namespace) -> dict:
    feat = distopt_features()
    d = init_distributed(args)
    setup_logging(d)
    try:
        return _train(args, d, feat)
    finally:
        if d.initialized:
            dist.barrier()
            dist.destroy_process_group()


def _train(args: argparse.Namespace, d: Dist, feat: dict) -> dict:
    data = CharData.from_file(args.data)
    if args.seq_len >= len(data) - 1:
        raise SystemExit(
            f"--seq-len {args.seq_len} is too long for {args.data} ({len(data)} characters)"
        )
    model = build_model(args, data.vocab_size, d)
    n_params = model.num_params()
    model, optimizer = wrap_model(args, model, d, feat)
    scheduler = build_scheduler(args, optimizer, feat)
    accumulator = make_accumulator(args, model, feat)
    start_step = 0
    if args.save_dir is not None:
        start_step = maybe_resume(args, model, optimizer, scheduler, accumulator, feat)
    mode = (
        ("hsdp" if args.hybrid else "fsdp2")
        if args.fsdp
        else f"{'hybrid ' if args.hybrid else ''}zero-{args.zero}"
        if args.zero
        else ("ddp" if d.world_size > 1 else "single process")
    )
    log.info(
        "model %.2fM params, vocab %d, corpus %d chars; %s, world size %d, device %s; "
        "optim %s, schedule %s",
        n_params / 1e6,
        data.vocab_size,
        len(data),
        mode,
        d.world_size,
        d.device,
        args.optim,
        args.schedule,
    )

    tokens_per_step = args.batch_size * args.seq_len * args.accum_steps * d.world_size
    progress = Progress(args, d, start_step)
    first_loss = last_loss = float("nan")
    window: list[float] = []
    model.train()
    if callable(getattr(optimizer, "train", None)):  # schedule-free optimizers: y in the weights
        optimizer.train()
    t0 = time.perf_counter()
    t_window = t0
    steps_done = 0
    stats = StepStats(args.step_stats, d)
    stats.record(start_step)  # the counters before the first step
    for step in range(start_step, args.max_steps):
        maybe_crash(args, step, d)
        window.append(
            train_step(args, step, model, optimizer, scheduler, data, accumulator, d, feat)
        )
        steps_done += 1
        stats.record(step + 1)
        progress.advance()
        n = step + 1
        if n == start_step + 1 or n % args.log_every == 0 or n == args.max_steps:
            (loss,) = mean_across_ranks([sum(window) / len(window)], d, d.device)
            now = time.perf_counter()
            progress.update(
                n,
                loss,
                tokens_per_step * len(window) / max(now - t_window, 1e-9),
                optimizer.param_groups[0]["lr"],
            )
            if n == start_step + 1:
                first_loss = loss
            last_loss = loss
            window, t_window = [], now
        if args.save_dir is not None and (
            (args.save_every and n % args.save_every == 0) or n == args.max_steps
        ):
            save_checkpoint(args, n, model, optimizer, scheduler, accumulator, feat)
    elapsed = time.perf_counter() - t0
    progress.close()
    tok_s = tokens_per_step * steps_done / max(elapsed, 1e-9)
    if args.final_state is not None:
        write_final_state(args.final_state, model, d)
    summary = {
        "steps": args.max_steps,
        "loss": last_loss,
        "first_loss": first_loss,
        "tokens_per_s": tok_s,
        "time": elapsed,
    }
    if d.is_main:
        log.info(
            "final: steps=%d loss=%.4f first_loss=%.4f tokens/s=%.0f time=%.1fs",
            args.max_steps,
            last_loss,
            first_loss,
            tok_s,
            elapsed,
        )
    if args.sample:
        sample(args, model, data, d)
    return summary


def sample(args, model, data: CharData, d: Dist) -> None:
    """Every rank generates (FSDP2 needs all of them in the forward); rank 0 prints."""
    net = getattr(model, "module", model)
    net.eval()
    g_state = torch.random.get_rng_state()
    torch.manual_seed(args.seed)
    start = data.ids[: min(8, args.seq_len)].unsqueeze(0).to(d.device)
    out = net.generate(start, args.sample, temperature=0.8)[0].tolist()
    torch.random.set_rng_state(g_state)
    if d.is_main:
        print(data.decode(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
