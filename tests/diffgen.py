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
parameters whose forward runs in bf16 (every weight cast to bf16 where it is used, inputs bf16):
that is what fp32 masters compute — bf16 weights rounded from fp32 values, fp32 updates.  Initial
and loaded values are bf16-representable, so both start equal; the ZeRO bucket reduces bf16
gradients (DDP: fp32), and the bf16 model weights are the masters rounded, so the comparison
tolerance is a few bf16 ulps (``BF16_TOL``), not fp32's.  FSDP2 runs the same program with
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on fp32 parameters.

FSDP2 (torch's own semantics, not distopt's) differs from DDP in two places, so programs that
touch them do not run FSDP2, and say so in ``describe``: a parameter no rank used in a whole
step gets a zero gradient (``set_reduce_scatter_unused_params``) where DDP leaves ``None``; and
``torch.amp.GradScaler`` finds infs per rank on sharded gradients (no agreement across ranks).
FSDP2 also refuses 0-dim parameters: there the gate has shape (1,).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("ddp", "zero1", "zero2", "fsdp2")
MAX_WORLD = 3
FP32_TOL = {"rtol": 1e-5, "atol": 2e-6}
BF16_TOL = {"rtol": 2e-2, "atol": 4e-3}
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


def _draw_step(rng: random.Random, spec: ModelSpec, scaler: bool, lookahead: bool, t: int) -> Step:
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
    targets = ("model", "model", "opt", "opt", "module")

    def zg():
        return (rng.choice(targets), rng.random() < 0.5)

    skip = rng.random() < 0.15
    zero_before = zg() if rng.random() < 0.6 else None
    zero_after = zg() if (skip or rng.random() < 0.35) else None
    clip = None
    if not skip and rng.random() < 0.45:
        clip = (
            rng.choice(("model", "params_distopt", "params_torch")),
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


def draw_program(seed: int) -> Program:
    """The program of ``seed`` (same seed, same program, in any process)."""
    from tests.optim_cases import sharding_cases

    rng = random.Random(seed)
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
        frozen_in_opt=rng.random() < 0.5,
        aux=rng.random() < 0.5,
    )
    cases = sharding_cases()
    case = rng.choice(cases).id
    lookahead = case.startswith("lookahead")
    scaler = rng.random() < 0.3
    steps = [_draw_step(rng, spec, scaler, lookahead, t) for t in range(rng.randint(3, 5))]
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
        steps=steps,
    )


def describe(prog: Program, world: int | None = None) -> str:
    """The whole program, one line per step (enough to rebuild it by hand)."""
    how = f"--seed {prog.seed}" if prog.name == f"seed{prog.seed}" else f"--name {prog.name}"
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
            out = out + self._lin(self.aux, pooled).sum(-1, keepdim=True)
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
