"""``distopt bench step``: optimizer step time vs ``torch.optim.AdamW(fused=True)``.

On a ViT-S/16 parameter set (timm's ``vit_small_patch16_224``: 152 fp32 tensors, 22.05M
parameters; ``--quick``: a 2-block, width-64 set) every distopt optimizer is timed with its
default settings (weight decay 0.01 where it defaults to 0), side by side with torch's fused
AdamW and, where installed, timm's / transformers' / torch's implementation of the same
algorithm.  Only ``optimizer.step()`` is timed: gradients are fixed random tensors set once, so
Adahessian's Hessian-vector product (part of its backward pass) is not counted.

Candidates are compared in groups (one distopt optimizer, its peers and the torch fused AdamW
baseline), interleaved step by step over ``--repeats`` rounds in a rotating order; the table
reports the first step separately (state allocation, the compile of distopt's rules: cold or warm
cache, said above the table), then, after ``--warmup``
untimed steps, the median of ``--repeats`` steps, and the ratio of that median to the baseline's median *in the same group* (ratios are
what carries over between machines; absolute times on a shared machine are noise).  ``bytes/param``
is the least memory traffic per parameter element the optimizer's maths needs (parameter and
gradient reads, every parameter-sized state read and written, one more read for whole-tensor
statistics; see ``distopt/bench/_traffic.py``) and ``GB/s`` that traffic over the median step:
how far each row is from the memory-bound minimum.

Before timing, the CPU benchmark allocates and frees one 31 MiB buffer, as the activations of
any training step do: glibc then serves the per-call buffers of compiled kernels (a few MB)
from its heap, as in a training process, instead of mapping and faulting in fresh pages after
its heap top is trimmed (a process that only ever held optimizer-sized tensors keeps glibc's
start-up thresholds: 0 to ~14,000 page faults per step for rules whose kernels allocate).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from distopt.bench._params import make_params, quick_shapes, vit_shapes
from distopt.bench._traffic import statistics_reads, traffic, whole_tensor_stats

__all__ = ["add_parser", "run", "GROUPS", "kernel_cache"]

WEIGHT_DECAY = 0.01


# --------------------------------------------------------------------------- peers


def _timm(module: str, cls: str) -> Callable[..., torch.optim.Optimizer] | None:
    """A class from ``timm.optim.<module>`` imported without timm's model zoo (no torchvision)."""
    try:
        if "timm.optim" not in sys.modules:
            spec = importlib.util.find_spec("timm")
            if spec is None or not spec.submodule_search_locations:
                return None
            locations = list(spec.submodule_search_locations)
            if "timm" not in sys.modules:
                pkg = types.ModuleType("timm")
                pkg.__path__ = locations
                pkg.__spec__ = spec
                sys.modules["timm"] = pkg
            sub = types.ModuleType("timm.optim")
            sub.__path__ = [loc + "/optim" for loc in locations]
            sys.modules["timm.optim"] = sub
        return getattr(importlib.import_module(f"timm.optim.{module}"), cls)
    except Exception:  # noqa: BLE001 - any import problem: peer not available
        return None


def _schedulefree(cls: str) -> Callable[..., torch.optim.Optimizer] | None:
    """A class of facebookresearch/schedule_free's package, if installed."""
    try:
        return getattr(importlib.import_module("schedulefree"), cls)
    except Exception:  # noqa: BLE001
        return None


def _transformers(cls: str) -> Callable[..., torch.optim.Optimizer] | None:
    try:
        return getattr(importlib.import_module("transformers.optimization"), cls, None)
    except Exception:  # noqa: BLE001
        return None


def _torch(cls: str, **fixed: Any) -> Callable[[], Callable[..., torch.optim.Optimizer] | None]:
    def get():
        c = getattr(torch.optim, cls, None)
        if c is None:
            return None
        return lambda params, **kw: c(params, **{**kw, **fixed})

    return get


@dataclass
class Group:
    """One distopt optimizer and its peers (``(label, loader, kwargs)``)."""

    name: str  # distopt.optim class name
    kwargs: dict[str, Any] = field(default_factory=dict)
    peers: list[tuple[str, Callable[[], Any], dict[str, Any]]] = field(default_factory=list)
    note: str = ""
    wrap_lookahead: bool = False
    second_order: bool = False  # first step needs gradients with a graph (Hessian-vector product)


def _wd(**kw: Any) -> dict[str, Any]:
    return {"weight_decay": WEIGHT_DECAY, **kw}


GROUPS: list[Group] = [
    Group("AdamW", _wd(), [("timm AdamWLegacy", lambda: _timm("adamw", "AdamWLegacy"), _wd()),
                           ("torch AdamW(foreach)", _torch("AdamW", foreach=True), _wd())]),
    Group("Adam", _wd(), [("torch Adam(foreach)", _torch("Adam", foreach=True), _wd())]),
    Group("Nadam", _wd(), [("timm NAdamLegacy", lambda: _timm("nadam", "NAdamLegacy"), _wd()),
                           ("torch NAdam(foreach)", _torch("NAdam", foreach=True), _wd())]),
    Group("RAdam", _wd(), [("timm RAdamLegacy", lambda: _timm("radam", "RAdamLegacy"), _wd()),
                           ("torch RAdam(foreach)", _torch("RAdam", foreach=True), _wd())]),
    Group("Adamax", _wd(), [("torch Adamax(foreach)", _torch("Adamax", foreach=True), _wd())]),
    Group("AdaBelief", _wd(), [("timm AdaBelief", lambda: _timm("adabelief", "AdaBelief"), _wd())]),
    Group("AdamP", _wd(), [("timm AdamP", lambda: _timm("adamp", "AdamP"), _wd())]),
    Group("Lamb", _wd(), [("timm Lamb", lambda: _timm("lamb", "Lamb"), _wd())]),
    Group("Lars", _wd(), [("timm Lars", lambda: _timm("lars", "Lars"), _wd())]),
    Group("NvNovoGrad", _wd(), [("timm NvNovoGrad", lambda: _timm("nvnovograd", "NvNovoGrad"), _wd())]),
    Group("MADGRAD", _wd(), [("timm MADGRAD", lambda: _timm("madgrad", "MADGRAD"), _wd())]),
    Group("Adafactor", _wd(), [("transformers Adafactor", lambda: _transformers("Adafactor"), _wd())]),
    Group("AdafactorTimm", _wd(), [("timm Adafactor", lambda: _timm("adafactor", "Adafactor"), _wd())]),
    Group("AdafactorBigVision", _wd(lr=1e-2),
          [("timm AdafactorBigVision", lambda: _timm("adafactor_bv", "AdafactorBigVision"), _wd(lr=1e-2))],
          note="bf16 momentum (timm's default); factored over the two largest dims"),
    Group("Adahessian", _wd(update_each=10**9),
          [("timm Adahessian", lambda: _timm("adahessian", "Adahessian"), _wd(update_each=10**9))],
          note="first step includes the Hessian-vector product; the median is the update only",
          second_order=True),
    Group("AdamWeightDecay", _wd(), []),
    Group("Muon", _wd(lr=0.02), [("timm Muon", lambda: _timm("muon", "Muon"), _wd(lr=0.02))],
          note="Newton-Schulz (bf16) on every matrix; AdamW on vectors"),
    Group("Lion", _wd(lr=1e-4), [("timm Lion", lambda: _timm("lion", "Lion"), _wd(lr=1e-4))]),
    Group("NAdamW", _wd(), [("timm NAdamW", lambda: _timm("nadamw", "NAdamW"), _wd())]),
    Group("Adopt", _wd(), [("timm Adopt", lambda: _timm("adopt", "Adopt"), _wd())]),
    Group("LaProp", _wd(), [("timm LaProp", lambda: _timm("laprop", "LaProp"), _wd())]),
    Group("SGDW", _wd(lr=0.1, momentum=0.9), [("timm SGDW", lambda: _timm("sgdw", "SGDW"), _wd(lr=0.1, momentum=0.9))]),
    Group("Adan", _wd(), [("timm Adan", lambda: _timm("adan", "Adan"), _wd())]),
    Group("Mars", _wd(), [("timm Mars", lambda: _timm("mars", "Mars"), _wd())],
          note="per-tensor norm of the corrected gradient"),
    Group("Kron", _wd(), [("timm Kron (eager)", lambda: _timm_kron_eager(), _wd())],
          note="preconditioner updated every step (the default schedule's first 500 steps)"),
    Group("AdamWScheduleFree", _wd(), [("schedulefree AdamWScheduleFree",
                                        lambda: _schedulefree("AdamWScheduleFree"), _wd())],
          note="train mode; z and the second moment per parameter"),
    Group("SGDScheduleFree", _wd(lr=0.1), [("schedulefree SGDScheduleFree",
                                            lambda: _schedulefree("SGDScheduleFree"), _wd(lr=0.1))]),
    Group("RAdamScheduleFree", _wd(), [("schedulefree RAdamScheduleFree",
                                        lambda: _schedulefree("RAdamScheduleFree"), _wd())]),
    Group("SGD", _wd(lr=0.1), [("torch SGD(foreach)", _torch("SGD", foreach=True), _wd(lr=0.1))]),
    Group("SGDP", _wd(lr=0.1), [("timm SGDP", lambda: _timm("sgdp", "SGDP"), _wd(lr=0.1))]),
    Group("RMSprop", _wd(), [("torch RMSprop(foreach)", _torch("RMSprop", foreach=True), _wd())]),
    Group("RMSpropTF", _wd(), [("timm RMSpropTF", lambda: _timm("rmsprop_tf", "RMSpropTF"), _wd())]),
    Group("Adagrad", _wd(), [("torch Adagrad(foreach)", _torch("Adagrad", foreach=True), _wd())]),
    Group("Adadelta", _wd(), [("torch Adadelta(foreach)", _torch("Adadelta", foreach=True), _wd())]),
    Group("AdamW", _wd(), [("timm Lookahead(torch AdamW fused)", lambda: _timm_lookahead(), _wd())],
          note="Lookahead(k=6): the median excludes the 1-in-6 slow-weight pass",
          wrap_lookahead=True),
]


def _timm_kron_eager():
    """timm's Kron without its torch.compile'd kernels (compiling costs minutes of CPU per shape;
    distopt's Kron is eager too).  Only with opt_einsum installed: without it torch.einsum
    contracts timm's preconditioner expression left to right through outer products of every
    factor (gigabytes for a ViT block), as timm warns."""
    cls = _timm("kron", "Kron")
    if cls is None or importlib.util.find_spec("opt_einsum") is None:
        return None
    sys.modules[cls.__module__].has_dynamo = False  # read by the constructor
    return cls


def _timm_lookahead():
    la = _timm("lookahead", "Lookahead")
    if la is None:
        return None
    return lambda params, **kw: la(torch.optim.AdamW(params, fused=True, **kw))


# --------------------------------------------------------------------------- timing


@dataclass
class Candidate:
    label: str
    impl: str
    opt: torch.optim.Optimizer
    params: list[torch.Tensor]
    first: float = 0.0
    times: list[float] = field(default_factory=list)


def _candidate(label: str, impl: str, factory: Callable[..., Any], kwargs: dict[str, Any],
               shapes: list, seed: int, device: torch.device | None = None) -> Candidate:
    params, grads = make_params(shapes, seed=seed)
    if device is not None and device.type != "cpu":
        params = [torch.nn.Parameter(p.detach().to(device)) for p in params]
        grads = [g.to(device) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    opt = factory(params, **kwargs)
    if callable(getattr(opt, "train", None)):  # schedule-free optimizers step in train mode
        opt.train()
    return Candidate(label, impl, opt, params)


def _first_step(c: Candidate, second_order: bool) -> float:
    """Time the first step; for second-order optimizers give it gradients with a graph.

    The Hessian-vector product of that step is computed once (``update_each`` is huge), so the
    following steps, with the fixed gradients again, time the update alone.
    """
    if not second_order:
        return _time_step(c)
    fixed = [p.grad for p in c.params]
    for p in c.params:
        p.grad = None
    loss = sum(0.5 * (p * p).sum() for p in c.params)
    loss.backward(create_graph=True)
    t = _time_step(c)
    for p, g in zip(c.params, fixed):
        p.grad = g
    return t


def _time_step(c: Candidate) -> float:
    dev = c.params[0].device
    if dev.type == "cuda":  # time the kernels, not their launch: wait for the device around the step
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    c.opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def _thread_counts(threads: int | str | list[int] | tuple[int, ...] | None) -> list[int | None]:
    """``--threads``: one count, a comma-separated list (``"1,2"``), or None (torch's setting)."""
    if threads is None:
        return [None]
    if isinstance(threads, str):
        try:
            counts = [int(t) for t in threads.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--threads must be a thread count or a comma-separated list like 1,2; got {threads!r}") from None
    elif isinstance(threads, int):
        counts = [threads]
    else:
        counts = [int(t) for t in threads]
    if not counts or any(t < 1 for t in counts):
        raise ValueError(f"--threads must be >= 1 (one count or a list like 1,2); got {threads!r}")
    return list(dict.fromkeys(counts))


def _device(device: str | torch.device) -> torch.device:
    """The ``--device`` to time on: ``cpu`` or ``cuda[:N]`` (which must be visible)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _row_label(group: Group) -> str:
    return f"Lookahead({group.name})" if group.wrap_lookahead else group.name


def _selected(groups: list[Group], names: str | None) -> list[Group]:
    if not names:
        return groups
    wanted = {n.strip().lower() for n in names.split(",") if n.strip()}
    picked = [g for g in groups if _row_label(g).lower() in wanted or
              (g.name.lower() in wanted and not g.wrap_lookahead)]
    unknown = wanted - {_row_label(g).lower() for g in groups} - {g.name.lower() for g in groups}
    if unknown:
        valid = ", ".join(sorted({_row_label(g) for g in groups}))
        raise ValueError(f"unknown optimizer(s) for --optim: {', '.join(sorted(unknown))}; valid: {valid}")
    return picked


def run(
    optim: str | None = None,
    repeats: int = 10,
    warmup: int = 3,
    threads: int | str | list[int] | None = None,
    quick: bool = False,
    fmt: str = "text",
    out: Any = None,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Run the benchmark, print the table to ``out`` (stdout) and return its rows.

    ``threads``: one torch intra-op thread count, or several (``[1, 2]`` or ``"1,2"``): the
    whole benchmark runs once per count and one table shows every count (a ``threads``
    column).  ``device``: ``cpu`` or ``cuda[:N]`` (timed with a device synchronisation around
    each step; torch's fused AdamW baseline runs on the same device).
    """
    out = out or sys.stdout
    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if warmup < 0:
        raise ValueError("--warmup must be >= 0")
    counts = _thread_counts(threads)
    dev = _device(device)
    if dev.type == "cpu":
        _as_in_training()
    cache = kernel_cache()  # before anything compiles: cold or warm
    previous = torch.get_num_threads()
    per_count: list[list[dict[str, Any]]] = []
    try:
        for n in counts:
            if n is not None:
                torch.set_num_threads(n)
            rows, shapes, numel, skipped = _run(optim, repeats, warmup, quick, progress, dev)
            for r in rows:
                r["threads"] = torch.get_num_threads()
            per_count.append(rows)
    finally:
        torch.set_num_threads(previous)
    # one table: each row followed by the same row at the other thread counts
    rows = [r for same in zip(*per_count) for r in same]
    label = ",".join(str(p[0]["threads"]) for p in per_count)
    for r in rows:
        r["kernel_cache"] = cache
    _print(rows, shapes, numel, repeats, warmup, fmt, skipped, out,
           threads=label, by_threads=len(counts) > 1, device=dev, cache=cache)
    return rows


#: bytes of the buffer :func:`_as_in_training` allocates and frees: under glibc's largest
#: dynamic mmap threshold (32 MiB on 64-bit), so freeing it raises the threshold to its size
ACTIVATIONS = 31 << 20


def _as_in_training() -> None:
    """Allocate and free one activation-sized CPU buffer (see the module docstring): glibc
    raises its mmap threshold to that size and its heap-trim threshold to twice it, as after a
    training step's forward and backward pass."""
    buf = torch.empty(ACTIVATIONS, dtype=torch.uint8)
    del buf


def kernel_cache() -> str:
    """How distopt's single-pass rules will run, and whether their first step compiles cold.

    ``eager`` (``DISTOPT_KERNELS=eager``: no compile), else ``cold`` (the inductor cache
    directory holds no compiled graph yet: the first step of each optimizer includes a full
    compile) or ``warm`` (compiled graphs on disk: the first step loads them).
    """
    from distopt.optim import _kernel as K

    if K.mode() == "eager":
        return "eager"
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path:
        try:
            from torch._inductor.runtime.cache_dir_utils import cache_dir  # no public getter
            path = cache_dir()
        except Exception:  # noqa: BLE001 - unknown layout: say nothing about the cache
            return "compile (cache state unknown)"
    graphs = os.path.join(path, "fxgraph")
    warm = os.path.isdir(graphs) and any(os.scandir(graphs))
    return f"{'warm' if warm else 'cold'} ({path})"


def _run(optim: str | None, repeats: int, warmup: int, quick: bool, progress: bool,
         device: torch.device) -> tuple[list[dict[str, Any]], list, int, list[str]]:
    import distopt.optim as do

    shapes = quick_shapes() if quick else vit_shapes()
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    groups = _selected(GROUPS, optim)

    baseline = _candidate("torch.optim.AdamW(fused=True)", "torch", torch.optim.AdamW,
                          {"fused": True, "weight_decay": WEIGHT_DECAY}, shapes, seed=0, device=device)
    baseline.first = _time_step(baseline)
    for _ in range(warmup):
        _time_step(baseline)
    rows: list[dict[str, Any]] = []
    base_all: list[float] = []
    skipped: list[str] = []
    for gi, group in enumerate(groups):
        cls = getattr(do, group.name, None)
        if cls is None:
            skipped.append(f"{_row_label(group)} (not installed)")
            continue
        if group.wrap_lookahead:
            def factory(params, _cls=cls, **kw):
                return do.Lookahead(_cls(params, **kw))
        else:
            factory = cls
        cands = [_candidate(_row_label(group), "distopt", factory, group.kwargs, shapes, seed=1,
                            device=device)]
        for label, loader, kwargs in group.peers:
            peer = loader()
            if peer is not None:
                cands.append(_candidate(_row_label(group), label, peer, kwargs, shapes, seed=1,
                                        device=device))
        for c in cands:
            c.first = _first_step(c, group.second_order)
            for _ in range(warmup):  # untimed: some kernels are slow for a few calls
                _time_step(c)
        everyone = [baseline, *cands]
        base_times: list[float] = []
        for r in range(repeats):
            k = (r + gi) % len(everyone)
            for c in everyone[k:] + everyone[:k]:
                t = _time_step(c)
                (base_times if c is baseline else c.times).append(t)
        base_med = statistics.median(base_times)
        base_all.extend(base_times)
        # peers move what distopt's maths needs
        whole, reads = whole_tensor_stats(cands[0].opt), statistics_reads(cands[0].opt)
        for c in cands:
            med = statistics.median(c.times)
            rows.append({"optimizer": c.label, "impl": c.impl, "first_ms": 1e3 * c.first,
                         "median_ms": 1e3 * med, "ratio": med / base_med, "note": group.note
                         if c.impl == "distopt" else ""})
            rows[-1].update(traffic(c.opt, c.params, med, stats=whole, reads=reads))
            if progress:
                print(f"[bench step] {c.label} / {c.impl}: first {1e3 * c.first:.1f} ms, median "
                      f"{1e3 * med:.1f} ms, x{med / base_med:.2f} (baseline {1e3 * base_med:.1f} ms)",
                      file=sys.stderr, flush=True)
        del cands, everyone
        if not quick:
            gc.collect()  # release the group's parameters and state before the next one
    base_row = {"optimizer": "AdamW", "impl": "torch.optim.AdamW(fused=True)",
                "first_ms": 1e3 * baseline.first,
                "median_ms": 1e3 * statistics.median(base_all) if base_all else float("nan"),
                "ratio": 1.0, "note": "baseline (median over all groups)"}
    base_row.update(traffic(baseline.opt, baseline.params, base_row["median_ms"] / 1e3, stats=False))
    rows.insert(0, base_row)
    return rows, shapes, numel, skipped


def _where(device: torch.device | None, threads: str) -> str:
    """The info line's machine part: threads and CPU, or the GPU's name."""
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device}), {threads} host threads"
    return f"{threads} threads, {platform.machine()}"


def _print(rows, shapes, numel, repeats, warmup, fmt, skipped, out, threads: str | None = None,
           by_threads: bool = False, device: torch.device | None = None,
           cache: str | None = None) -> None:
    header = ["optimizer", "implementation", "first step incl. compile (ms)", "median step (ms)",
              "x torch fused AdamW", "note"]
    body = [[r["optimizer"], r["impl"], f"{r['first_ms']:.1f}", f"{r['median_ms']:.1f}",
             f"{r['ratio']:.2f}", r["note"]] for r in rows]
    header[5:5] = ["bytes/param", "GB/s"]  # least bytes the maths moves per parameter, achieved rate
    for b, r in zip(body, rows):
        b[5:5] = [f"{r['bytes_per_param']:.0f}", f"{r['gbps']:.1f}"]
    if by_threads:  # several thread counts in one table
        header.insert(2, "threads")
        for b, r in zip(body, rows):
            b.insert(2, str(r["threads"]))
    info = (f"{len(shapes)} fp32 tensors, {numel:,} parameters; median of {repeats} interleaved "
            f"steps after {warmup} untimed; torch {torch.__version__}, "
            f"{_where(device, threads or str(torch.get_num_threads()))}")
    if cache is not None:
        info += (f"\ndistopt kernels: {cache}; the first step includes compiling each rule "
                 "(cold: a full compile, and the first compiling optimizer also pays inductor's one-off C++ ISA checks; warm: loading it from disk)"
                 if cache != "eager" else "\ndistopt kernels: eager (DISTOPT_KERNELS=eager): nothing compiles")
        if by_threads and cache != "eager":
            info += ("; CPU kernels have one build for 1 thread (serial C++) and one for more "
                     "threads, so the first step at the first count of each kind includes its compile")
    if fmt == "md":
        print(info + "\n", file=out)
        print("| " + " | ".join(header) + " |", file=out)
        print("|" + "|".join(["---"] * (3 if by_threads else 2) + ["---:"] * 5 + ["---"]) + "|", file=out)
        for b in body:
            print("| " + " | ".join(b) + " |", file=out)
    else:
        print(info, file=out)
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), file=out)
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip(), file=out)
    if skipped:
        print(f"\nnot run: {', '.join(skipped)}", file=out)


# --------------------------------------------------------------------------- CLI


def _main(args: argparse.Namespace) -> int:
    run(optim=args.optim, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
        quick=args.quick, fmt=args.format, progress=args.progress, device=args.device)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="time optimizer.step() of every optimizer vs torch fused AdamW",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optim", default=None,
                   help="comma-separated subset (class names, e.g. AdamW,Lamb,Lookahead(AdamW))")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per candidate (default 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps after the first one, before timing (default 3)")
    p.add_argument("--threads", default=None,
                   help="torch intra-op threads: one count, or several (e.g. 1,2) reported in one "
                        "table (default: torch's current setting)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: where parameters, gradients and state live")
    p.add_argument("--quick", action="store_true", help="small parameter set (for tests)")
    p.add_argument("--format", choices=["text", "md"], default="text", help="table format")
    p.add_argument("--progress", action="store_true", help="print each row to stderr as it is measured")
    p.set_defaults(func=_main)
