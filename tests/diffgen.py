"""Differential test generator: small training programs run under DDP, ZeRO-1, ZeRO-2 and FSDP2.

A *program* is drawn from one integer seed (``draw_program(seed)``, a seeded ``random.Random``,
no shrinking) and is plain data, so it pickles into the spawned ranks and prints in full
(``describe``).  It fixes

* a model topology: an embedding, a trunk applied once or twice (shared weights), an output head
  tied to the embedding or not, MoE-like experts each rank routes its tokens to (or not) per
  micro-batch, a 3-D stack of experts, a conv kernel, a 0-dim gate, a 1-row parameter, a frozen
  layer, an auxiliary head used on some steps only;
* an optimizer from the case table (``sharding_cases()``), with a second param group added
  (``add_param_group``) before sharding or not; fp32, or bf16 parameters with fp32 master rows;
* bucket sizes from ~100 bytes (every parameter its own bucket) to 25 MiB;
* per step: micro-batches (all but the last in a ``no_sync`` window), per-rank batch sizes and
  expert routing, ``zero_grad`` before/after on the wrapper, the raw module or the optimizer,
  either way (``set_to_none``), skipped steps, clipping through the model or ``.parameters()``
  (distopt's and torch's), ``torch.amp.GradScaler`` with an injected overflow in one 1-row
  parameter, and after the step: model ``load_state_dict``, state round trips
  (``state_dict``/``load_state_dict`` of model and optimizer, or ``distopt.checkpoint``),
  ``Lookahead.sync_lookahead()``, and a new optimizer with a second ``distopt.shard``.

:mod:`tests.diffrun` runs each program under DDP, ZeRO-1, ZeRO-2 and FSDP2 and compares.

bf16: "equal to DDP" for bf16 parameters with fp32 master rows means equal to DDP training *fp32*
parameters whose forward runs in bf16 (every weight cast to bf16 where it is used, inputs bf16)
and whose gradients are averaged in bf16 (a DDP communication hook, as ZeRO averages bf16
gradients in their dtype): that is what fp32 masters compute — bf16 weights rounded from fp32
values, bf16 gradients, fp32 updates.  Initial and loaded values are bf16-representable, so both
start equal.  What still differs is rounding (the model's weights are the masters rounded; a
parameter used twice sums its gradients in bf16 under ZeRO, in fp32 under DDP), and an adaptive
optimizer turns a rounding difference in a near-zero gradient into an lr-sized step; so a bf16
program passes when at most ``BF16_OUTLIERS`` of the elements lie outside ``BF16_TOL`` (a few
bf16 ulps) and none is further than ``BF16_MAX_ERR`` from DDP's.  A defect moves many elements:
before the fix, issue 11's item 2 put 9% of them outside by step 3, item 3 97% at step 2.  FSDP2 runs the same program with
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on fp32 parameters.

FSDP2 (torch's own semantics, not distopt's) differs from DDP in three places, so programs that
touch them do not run FSDP2, and say so in ``describe``: a parameter no rank used in a whole
step gets a zero gradient (``set_reduce_scatter_unused_params``) where DDP leaves ``None``;
``torch.amp.GradScaler`` finds infs per rank on sharded gradients (no agreement across ranks);
and in bf16, the fp32 zeros it fills in for a parameter unused on one rank meet bf16 gradients,
which it refuses.  FSDP2 also refuses 0-dim parameters: there the gate has shape (1,).
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("ddp", "zero1", "zero2", "fsdp2")
MAX_WORLD = 3
FP32_TOL = {"rtol": 1e-5, "atol": 2e-6}
BF16_TOL = {"rtol": 2e-2, "atol": 4e-3}
BF16_OUTLIERS = 0.02  # bf16: this fraction of elements may lie outside BF16_TOL ...
BF16_MAX_ERR = 0.05  # ... if no element is further than this from DDP's
NORM_RTOL = 1e-4
OVERFLOW = 1e36  # times a zero-valued term of one 1-row parameter: its scaled gradient is inf
BUCKETS_MB = (1e-4, 3e-4, 2e-3, 25.0)


@dataclass
class ModelSpec:
    d: int
    vocab: int
    tie: bool
    twice: bool
    experts: int
    expert_bias: bool
    stack: int  # 0: no 3-D stack of experts
    conv: bool
    gate: bool  # 0-dim parameter
    row: bool  # 1-row parameter
    frozen: bool
    frozen_in_opt: bool
    aux: bool


@dataclass
class Step:
    micro: list[dict]  # per micro-batch: bs / route / stack per rank (MAX_WORLD entries)
    aux: bool
    zero_before: tuple | None  # (target, set_to_none); target in model / module / opt
    zero_after: tuple | None
    skip: bool  # zero_grad (zero_after) instead of the step
    clip: tuple | None  # (how, max_norm); how in model / params_distopt / params_torch
    overflow: bool
    after: list[str] = field(default_factory=list)


@dataclass
class Program:
    seed: int
    name: str
    model: ModelSpec
    case: str
    split_groups: bool
    bucket_mb: float
    bf16: bool
    scaler: bool
    steps: list[Step]
    modes: tuple = MODES
    avoid: frozenset = frozenset()

    def fsdp2_reason(self) -> str | None:
        """Why FSDP2 cannot follow DDP's semantics in this program (None: it can)."""
        if self.scaler and any(s.overflow for s in self.steps):
            return (
                "GradScaler overflow: torch's GradScaler does not agree on infs across FSDP2 shards"
            )
        if self.bf16 and any(
            set(mb["route"][r]) != set(range(self.model.experts))
            for s in self.steps
            for mb in s.micro
            for r in range(2)
        ):
            return "bf16 with experts unused on a rank: FSDP2 zero-fills them in fp32 next to bf16 gradients (torch refuses)"
        for t in range(len(self.steps)):
            if unused_everywhere(self, t):
                return f"step {t}: {sorted(unused_everywhere(self, t))} unused on every rank (FSDP2 zero-fills)"
        return None


def unused_everywhere(prog: Program, t: int) -> set[str]:
    """Trainable modules that no rank uses in any micro-batch of step ``t`` (at MAX_WORLD ranks
    or fewer: checked for the first 2 ranks, which every world size has)."""
    spec, step = prog.model, prog.steps[t]
    out = set()
    if spec.aux and not step.aux:
        out.add("aux")
    for e in range(spec.experts):
        if not any(e in mb["route"][r] for mb in step.micro for r in range(2)):
            out.add(f"experts.{e}")
    return out


# ----------------------------------------------------------------------------- drawing


def _draw_step(
    rng: random.Random, spec: ModelSpec, scaler: bool, lookahead: bool, avoid: frozenset
) -> Step:
    micro = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        micro.append(
            {
                "bs": [rng.randint(1, 3) for _ in range(MAX_WORLD)],
                "route": [
                    sorted(e for e in range(spec.experts) if rng.random() < 0.45)
                    for _ in range(MAX_WORLD)
                ],
                "stack": [rng.randrange(spec.stack) if spec.stack else 0 for _ in range(MAX_WORLD)],
            }
        )
    targets = ("model", "model", "opt", "opt", "model" if "zero_grad:module" in avoid else "module")

    def zg():
        return (rng.choice(targets), rng.random() < 0.5)

    skip = rng.random() < 0.15
    zero_before = zg() if rng.random() < 0.6 else None
    zero_after = zg() if (skip or rng.random() < 0.35) else None
    clip = None
    if not skip and rng.random() < 0.45:
        clip = (
            rng.choice(
                (
                    "model",
                    "params_distopt",
                    "params_distopt" if "clip:params_torch" in avoid else "params_torch",
                )
            ),
            rng.choice((0.05, 0.5, 1.0, 100.0)),
        )
    after = []
    if not skip:
        if rng.random() < 0.12:
            after.append("load_fresh_wrapper" if rng.random() < 0.5 else "load_fresh_module")
        if lookahead and rng.random() < 0.3:
            after.append("sync_lookahead")
    overflow = scaler and not skip and spec.row and rng.random() < 0.25
    return Step(micro, rng.random() < 0.7, zero_before, zero_after, skip, clip, overflow, after)


@functools.cache
def _case_ids() -> tuple[str, ...]:
    from tests.optim_cases import sharding_cases

    return tuple(c.id for c in sharding_cases())


def draw_program(seed: int, avoid: frozenset = frozenset(), case: str | None = None) -> Program:
    """The program of ``seed`` (same seed, same program, in any process).

    ``avoid``: actions not to draw (``zero_grad:module``, ``clip:params_torch``,
    ``frozen_outside_optimizer``), each replaced by its nearest supported form, the rest of the program unchanged (a long run can then look past
    a known failure).
    """
    rng = random.Random(seed)
    avoid = frozenset(avoid)
    spec = ModelSpec(
        d=rng.choice((4, 6, 8)),
        vocab=rng.choice((5, 7, 11)),
        tie=rng.random() < 0.5,
        twice=rng.random() < 0.5,
        experts=rng.choice((0, 2, 3, 4)),
        expert_bias=rng.random() < 0.5,
        stack=rng.choice((0, 0, 2, 3)),
        conv=rng.random() < 0.5,
        gate=rng.random() < 0.5,
        row=rng.random() < 0.6,
        frozen=rng.random() < 0.4,
        frozen_in_opt=rng.random() < 0.5 or "frozen_outside_optimizer" in avoid,
        aux=rng.random() < 0.5,
    )
    # its own stream: a change to the case table changes the optimizer only, not the program
    case = case or random.Random(seed * 7919 + 17).choice(_case_ids())
    lookahead = case.startswith("lookahead")
    scaler = rng.random() < 0.3
    steps = [_draw_step(rng, spec, scaler, lookahead, avoid) for _ in range(rng.randint(3, 5))]
    if rng.random() < 0.5:  # every parameter used somewhere in every step (FSDP2 can follow)
        for t, s in enumerate(steps):
            s.aux = True
            for e in range(spec.experts):
                if not any(e in mb["route"][r] for mb in s.micro for r in range(2)):
                    s.micro[0]["route"][t % 2] = sorted(s.micro[0]["route"][t % 2] + [e])
    # state round trips: save after one step, restore after a later one
    if len(steps) >= 3 and rng.random() < 0.3:
        a = rng.randrange(len(steps) - 2)
        b = rng.randrange(a + 1, len(steps) - 1)
        kind = "ckpt" if rng.random() < 0.3 else "state"
        steps[a].after.append(f"{kind}_save")
        steps[b].after.append(f"{kind}_load")
    elif rng.random() < 0.12:
        steps[rng.randrange(1, len(steps))].after.append("reshard")
    return Program(
        seed=seed,
        name=f"seed{seed}",
        model=spec,
        case=case,
        split_groups=rng.random() < 0.4,
        bucket_mb=rng.choice(BUCKETS_MB),
        bf16=rng.random() < 0.2,
        scaler=scaler,
        avoid=avoid,
        steps=steps,
    )


def describe(prog: Program, world: int | None = None) -> str:
    """The whole program, one line per step (enough to rebuild it by hand)."""
    seeded = prog.name == f"seed{prog.seed}"
    how = f"--seed {prog.seed} --case {prog.case}" if seeded else f"--name {prog.name}"
    how += "".join(f" --avoid {a}" for a in sorted(prog.avoid))
    lines = [
        f"program {prog.name} (replay: python -m tests.diffrun {how}"
        + (f" --world {world}" if world else "")
        + ")",
        f"  model: {asdict(prog.model)}",
        f"  optimizer {prog.case}, second group added before shard: {prog.split_groups}, "
        f"bucket_mb {prog.bucket_mb}, bf16+fp32 master: {prog.bf16}, GradScaler: {prog.scaler}",
    ]
    why = prog.fsdp2_reason()
    if why and "fsdp2" in prog.modes:
        lines.append(f"  fsdp2 not run: {why}")
    for t, s in enumerate(prog.steps):
        mbs = "; ".join(
            f"bs {mb['bs'][:world] if world else mb['bs']} route {mb['route'][:world] if world else mb['route']}"
            + (f" stack {mb['stack']}" if prog.model.stack else "")
            for mb in s.micro
        )
        lines.append(
            f"  step {t}: zero_before={s.zero_before} micro[{len(s.micro)}: {mbs}] aux={s.aux} "
            f"overflow={s.overflow} clip={s.clip} {'SKIP' if s.skip else 'step'} "
            f"zero_after={s.zero_after} after={s.after}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the model


class GenModel(nn.Module):
    """The drawn topology.  ``cdtype``: the dtype every weight is cast to where it is used."""

    def __init__(
        self, spec: ModelSpec, seed: int, gate_shape: tuple = (), bf16_values: bool = False
    ):
        super().__init__()
        torch.manual_seed(seed)
        d, v = spec.d, spec.vocab
        self.spec = spec
        self.cdtype = torch.float32
        self.emb = nn.Embedding(v, d)
        self.trunk = nn.Linear(d, d)
        self.head = nn.Linear(d, v, bias=not spec.tie)
        if spec.tie:
            self.head.weight = self.emb.weight
        if spec.experts:
            self.experts = nn.ModuleList(
                nn.Linear(d, d, bias=spec.expert_bias) for _ in range(spec.experts)
            )
        if spec.stack:
            self.stack = nn.Parameter(torch.randn(spec.stack, d, d) * 0.3)
        if spec.conv:
            self.conv = nn.Conv1d(d, d, 2)
        if spec.gate:
            self.gate = nn.Parameter(torch.full(gate_shape, 0.8))
        if spec.row:
            self.row = nn.Parameter(torch.randn(1, d) * 0.2)
        if spec.frozen:
            self.frozen = nn.Linear(d, d)
            self.frozen.requires_grad_(False)
        if spec.aux:
            self.aux = nn.Linear(d, 2)
        if bf16_values:
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(p.to(torch.bfloat16).float())

    def _w(self, p):
        return p.to(self.cdtype)

    def _lin(self, m, x):
        return F.linear(x, self._w(m.weight), None if m.bias is None else self._w(m.bias))

    def forward(self, tok, route, stack_idx, use_aux, inject=0.0):
        spec = self.spec
        h = F.embedding(tok, self._w(self.emb.weight))  # (B, L, d)
        h = torch.tanh(self._lin(self.trunk, h))
        if spec.twice:
            h = torch.tanh(self._lin(self.trunk, h))
        if spec.conv:
            c = F.conv1d(h.transpose(1, 2), self._w(self.conv.weight), self._w(self.conv.bias))
            h = h + c.mean(-1).unsqueeze(1)
        if spec.frozen:
            h = h + 0.5 * self._lin(self.frozen, h)
        for e in route:
            h = h + torch.tanh(self._lin(self.experts[e], h))
        if spec.stack:
            h = h + 0.5 * torch.tanh(h @ self._w(self.stack[stack_idx]))
        if spec.gate:
            h = h * self._w(self.gate)
        if spec.row:
            h = h + self._w(self.row)
        pooled = h.mean(1)
        out = self._lin(self.head, pooled)
        if use_aux and spec.aux:
            # on the first two logits only (a shift of every logit would leave the loss unchanged)
            out = out + F.pad(self._lin(self.aux, pooled), (0, out.shape[-1] - 2))
        extra = torch.zeros((), dtype=torch.float32)
        if inject:
            s = self._w(self.row).float().sum()
            extra = inject * (s - s.detach())  # value 0, gradient `inject` on the 1-row parameter
        return out, extra


def batch_for(prog: Program, t: int, i: int, r: int):
    mb = prog.steps[t].micro[i]
    g = torch.Generator().manual_seed(prog.seed * 1_000_003 + t * 1009 + i * 31 + r)
    n = mb["bs"][r]
    tok = torch.randint(0, prog.model.vocab, (n, 3), generator=g)
    target = torch.randint(0, prog.model.vocab, (n,), generator=g)
    return tok, target, mb["route"][r], mb["stack"][r]


def fresh_state(prog: Program, t: int, model: GenModel) -> dict[str, torch.Tensor]:
    """The values a ``load_fresh`` action loads (bf16-representable: exact in every mode)."""
    g = torch.Generator().manual_seed(prog.seed * 7 + t + 12345)
    out = {}
    for name, p in model.state_dict().items():
        p = p.full_tensor() if type(p).__name__ == "DTensor" else p
        v = (torch.randn(p.shape, generator=g) * 0.3).to(torch.bfloat16).float()
        out[name] = v.to(p.dtype)
    return out


# ----------------------------------------------------------------------------- regressions


def _mb(bs=(2, 3, 2), route=((0, 1, 2), (0, 1, 2), (0, 1, 2)), stack=(0, 0, 0)) -> dict:
    return {"bs": list(bs), "route": [sorted(r) for r in route], "stack": list(stack)}


def _step(micro=None, zero_before=("opt", True), **kw) -> Step:
    kw.setdefault("aux", False)
    for k in ("zero_after", "clip"):
        kw.setdefault(k, None)
    kw.setdefault("skip", False)
    kw.setdefault("overflow", False)
    return Step(micro or [_mb()], zero_before=zero_before, **kw)


def _fixed(
    name: str, steps: list[Step], modes=("ddp", "zero1", "zero2"), case="adamw", **kw
) -> Program:
    spec = ModelSpec(
        d=6, vocab=7, tie=False, twice=False, experts=3, expert_bias=True, stack=0, conv=True,
        gate=True, row=True, frozen=False, frozen_in_opt=False, aux=False,
    )  # fmt: skip
    args = {"split_groups": False, "bucket_mb": 25.0, "bf16": False, "scaler": False}
    args.update(kw)
    return Program(
        seed=0, name=name, model=spec, case=case, steps=steps, modes=tuple(modes), **args
    )


def regression_programs() -> dict[int, list[Program]]:
    """Issue 11's eight defects, each as fixed programs (compared with DDP like any other)."""
    some = _mb(route=((0, 1), (0,), (0, 2)))  # expert 1 on rank 0 only, expert 2 on rank 2 only
    other = _mb(bs=(1, 2, 3), route=((0,), (0, 1), (0,)))
    z_none = ("opt", False)
    return {
        1: [_fixed("issue11-item1-stage2-partial-grads-many-buckets",
                   [_step([some]), _step([other]), _step([some]), _step([other])],
                   modes=("ddp", "zero2"), bucket_mb=1e-4)],
        2: [_fixed(f"issue11-item2-master-zero-grad-keep-{target}",
                   [_step(zero_before=(target, False)) for _ in range(6)],
                   case="sgd-momentum-dampening", bf16=True)
            for target in ("opt", "model")],
        3: [_fixed(f"issue11-item3-master-load-state-dict-{via}",
                   [_step(), _step(after=[f"load_fresh_{via}"]), _step(), _step()], bf16=True)
            for via in ("wrapper", "module")],
        4: [_fixed("issue11-item4-grad-scaler", [_step(), _step(), _step()], scaler=True),
            _fixed("issue11-item4-grad-scaler-unscale-clip",
                   [_step(clip=("model", 0.05)) for _ in range(3)], scaler=True)],
        5: [_fixed(f"issue11-item5-skipped-step-{target}",
                   [_step(), _step(skip=True, zero_after=(target, True)), _step(zero_before=z_none), _step()])
            for target in ("opt", "model")],
        6: [_fixed(f"issue11-item6-clip-{how}", [_step(clip=(how, 0.05)) for _ in range(3)])
            for how in ("params_distopt", "params_torch")],
        7: [_fixed("issue11-item7-sync-lookahead",
                   [_step(after=["sync_lookahead"]), _step(after=["sync_lookahead"]), _step(), _step(after=["sync_lookahead"])],
                   modes=("ddp", "zero1", "zero2", "fsdp2"), case="lookahead_adamw")],
        8: [_fixed("issue11-item8-shard-twice",
                   [_step(), _step(after=["reshard"]), _step(), _step()])],
    }  # fmt: skip


def features(prog: Program) -> set[str]:
    """What a program exercises (for choosing and checking the CI seeds)."""
    from tests.optim_cases import CASES

    case = next(c for c in CASES if c.id == prog.case)
    m, steps = prog.model, prog.steps
    out = {k for k, v in asdict(m).items() if isinstance(v, bool) and v and k != "frozen_in_opt"}
    out |= {"experts>0"} if m.experts else set()
    out |= {"stack"} if m.stack else set()
    out |= {"bf16"} if prog.bf16 else set()
    out |= {"scaler"} if prog.scaler else set()
    out |= {"split_groups"} if prog.split_groups else set()
    out |= {"tiny_buckets"} if prog.bucket_mb <= 1e-4 else set()
    out |= {"shape_aware"} if case.shape_aware else set()
    out |= {"lookahead"} if prog.case.startswith("lookahead") else set()
    out |= {"fsdp2"} if not prog.fsdp2_reason() else set()
    for t, s in enumerate(steps):
        out |= {"overflow"} if s.overflow else set()
        out |= {"no_sync"} if len(s.micro) > 1 else set()
        out |= {"skip"} if s.skip else set()
        out |= {"unused_everywhere"} if unused_everywhere(prog, t) else set()
        for z in (s.zero_before, s.zero_after):
            if z:
                out.add(f"zero_grad:{z[0]}:{'none' if z[1] else 'keep'}")
        if s.clip:
            out.add(f"clip:{s.clip[0]}")
        out |= set(s.after)
        if any(set(mb["route"][0]) != set(mb["route"][1]) for mb in s.micro):
            out.add("routing_differs_by_rank")
    pairs = [
        ("fsdp2", x) for x in ("bf16", "scaler", "no_sync", "sync_lookahead", "state_load", "skip")
    ]
    pairs += [("fsdp2", f"clip:{k}") for k in ("model", "params_distopt", "params_torch")]
    pairs += [
        ("tiny_buckets", "routing_differs_by_rank"),
        ("bf16", "load_fresh_module"),
        ("bf16", "skip"),
    ]
    out |= {f"{a}&{b}" for a, b in pairs if a in out and b in out}
    return out


def _cost(prog: Program) -> int:
    c = sum(len(s.micro) for s in prog.steps) * (3 + (not prog.fsdp2_reason()))
    return c + sum(8 for s in prog.steps for a in s.after if a.startswith("ckpt"))


def pick_ci_seeds(candidates=range(1, 600)) -> list[tuple[int, str]]:
    """Greedy cheap ``(seed, optimizer case)`` pairs whose programs together exercise every
    feature the candidates do (how ``CI_PROGRAMS`` in tests/test_differential.py was chosen;
    rerun after changing how programs are drawn).  The case is pinned so that a change to the
    case table does not change the CI programs."""
    progs = {s: draw_program(s) for s in candidates}
    feats = {s: features(p) for s, p in progs.items()}
    wanted = set().union(*feats.values())
    chosen: list[int] = []
    covered: set[str] = set()
    while covered != wanted:
        best = max(
            (s for s in progs if s not in chosen),
            key=lambda s: len(feats[s] - covered) / _cost(progs[s]),
        )
        chosen.append(best)
        covered |= feats[best]
    return sorted((s, progs[s].case) for s in chosen)


def finding_programs() -> list[Program]:
    """Defects the generator found after issue 11's fixes, as fixed programs."""
    clip_frozen = _fixed(
        "finding-clip-parameters-with-frozen-layer", [_step(clip=("params_distopt", 0.05))] * 2
    )
    clip_frozen.model.frozen = True  # a frozen layer, not in the optimizer (as usual)
    return [
        # model.module.zero_grad(), the inner module's own zero_grad, as code written for DDP does
        _fixed(f"finding-zero-grad-inner-module-{'none' if none else 'keep'}",
               [_step(), _step(zero_before=("module", none)), _step(zero_before=("module", none))])
        for none in (True, False)
    ] + [clip_frozen, _fixed(
        # no step yet (skipped, as after a GradScaler overflow), gradients kept, then
        # Lookahead.sync_lookahead(): the next step raises KeyError ('step' / 'exp_avg') under DDP
        # too: the slow buffer put in the shared state makes the base optimizer think its state
        # exists
        "finding-sync-lookahead-before-first-step",
        [_step(skip=True, zero_after=("opt", False), after=["sync_lookahead"]), _step(), _step()],
        modes=("ddp", "zero2"), case="lookahead_lamb"),
        # gradients not zeroed before a second distopt.shard (new optimizer, new phase): DDP's
        # next step sees them accumulated with the next backward's; the new engine starts empty
        # (long mode, seed 100028)
        _fixed("finding-shard-twice-keeps-accumulated-grads",
               [_step(), _step(after=["reshard"]), _step(zero_before=None), _step()])]  # fmt: skip
