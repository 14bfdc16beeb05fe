"""The same training loop, written for DDP, gives the same numbers under distopt (issue 11).

One process group per world size (2 and 3) runs, in this order:

* the eight defects of issue 11 as fixed, named programs (``tests/diffgen.py``
  ``regression_programs``), each compared with torch's DistributedDataParallel;
* the CI slice of the differential generator: programs drawn from fixed seeds
  (``CI_SEEDS``), each run under DDP, distopt ZeRO-1, ZeRO-2 and FSDP2 (see ``tests/diffgen.py``
  for what a program draws and what "equal to DDP" means for bf16).

Every rank must hold the same parameters after every step, equal to DDP's.  A failure prints the
whole program and the command that replays it (``python -m tests.diffrun --seed N --world W``).

Long mode: ``DISTOPT_DIFF_MINUTES=30 pytest tests/test_differential.py -k long -n 0 -s`` (or
``python -m tests.diffrun --minutes 30``) draws new seeds until the time is up, world sizes one
after the other, and reports the number of programs tried.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from tests import diffgen, diffrun

CI_SEEDS = list(range(1, 15))
ISSUE11 = diffgen.regression_programs()


@functools.cache
def _results(world: int):
    regressions = [p for ps in ISSUE11.values() for p in ps]
    progs = regressions + [diffgen.draw_program(s) for s in CI_SEEDS]
    return progs, diffrun.run_batch(progs, world, timeout=900)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_zero_and_fsdp2_equal_ddp(world):
    """Issue 11's regressions and the fixed-seed programs, in one spawn per world size."""
    progs, fails = _results(world)
    lines = []
    items = [i for i, ps in ISSUE11.items() if any(fails[p.name] for p in ps)]
    seeds = [p.name for p in progs if p.name.startswith("seed") and fails[p.name]]
    if items or seeds:
        lines.append(
            f"world {world}: issue 11 items failing {items}; generated programs failing {seeds}"
        )
        lines.append(diffrun.report(progs, world, fails))
    assert not lines, "\n".join(lines)


def test_regression_programs_exercise_their_defect():
    """Each fixed program contains the situation its issue-11 item names (a guard against
    editing them into something that cannot fail)."""
    from distopt.zero._plan import make_plan

    p1 = ISSUE11[1][0]
    model = diffgen.GenModel(p1.model, p1.seed)
    _, buckets = make_plan(list(model.named_parameters()), 2, int(p1.bucket_mb * 2**20))
    assert len(buckets) > 3 and "zero2" in p1.modes
    routes = [mb["route"] for s in p1.steps for mb in s.micro]
    assert any(1 in r[0] and 1 not in r[1] for r in routes)  # expert 1 on some ranks only
    assert all(p.bf16 and p.steps[1].zero_before[1] is False for p in ISSUE11[2])
    assert all(
        p.bf16 and any("load_fresh" in a for s in p.steps for a in s.after) for p in ISSUE11[3]
    )
    assert all(p.scaler and "zero1" in p.modes for p in ISSUE11[4])
    assert all(any(s.skip for s in p.steps) and "zero1" in p.modes for p in ISSUE11[5])
    assert {p.steps[0].clip[0] for p in ISSUE11[6]} == {"params_distopt", "params_torch"}
    assert ISSUE11[7][0].case.startswith("lookahead")
    assert any("reshard" in s.after for s in ISSUE11[8][0].steps)


def test_programs_are_reproducible_and_varied():
    """Same seed, same program; the CI seeds cover the features the generator can draw."""
    assert diffgen.describe(diffgen.draw_program(5)) == diffgen.describe(diffgen.draw_program(5))
    assert diffgen.describe(diffgen.draw_program(5)) != diffgen.describe(diffgen.draw_program(6))
    progs = [diffgen.draw_program(s) for s in range(200)]
    steps = [s for p in progs for s in p.steps]
    drawn = {
        "bf16": any(p.bf16 for p in progs),
        "scaler overflow": any(s.overflow for s in steps),
        "no_sync": any(len(s.micro) > 1 for s in steps),
        "skip": any(s.skip for s in steps),
        "keep zero_grad": any(s.zero_before and not s.zero_before[1] for s in steps),
        "tiny buckets": any(p.bucket_mb < 1e-3 for p in progs),
        "fsdp2": any("fsdp2" in diffrun.modes_of(p) for p in progs),
    }
    for kind in ("params_distopt", "params_torch", "model"):
        drawn[f"clip {kind}"] = any(s.clip and s.clip[0] == kind for s in steps)
    for action in ("state_load", "ckpt_load", "reshard", "sync_lookahead", "load_fresh_module"):
        drawn[action] = any(action in s.after for s in steps)
    assert all(drawn.values()), {k: v for k, v in drawn.items() if not v}


def test_check_reports_a_divergence():
    """The comparison can fail: a one-ulp change, a rank that disagrees, a wrong clip norm."""
    prog = diffgen.draw_program(3)
    snap = {"w": torch.ones(4)}
    ref = diffrun.Run(params=[snap], norms=[(0, 2.0)])

    def run(v, norm=2.0):
        return diffrun.Run(params=[{"w": torch.full((4,), v)}], norms=[(0, norm)])

    ok = [{"ddp": ref, "zero2": run(1.0)}, {"ddp": ref, "zero2": run(1.0)}]
    assert diffrun.check(prog, 2, ok) == []
    bad = diffrun.check(
        prog, 2, [{"ddp": ref, "zero2": run(1.001)}, {"ddp": ref, "zero2": run(1.001)}]
    )
    assert bad and "differs from DDP" in bad[0]
    split = diffrun.check(
        prog, 2, [{"ddp": ref, "zero2": run(1.0)}, {"ddp": ref, "zero2": run(1.0 + 2**-20)}]
    )
    assert split and "rank 1 differs from rank 0" in split[0]
    norm = diffrun.check(prog, 2, [{"ddp": ref, "zero2": run(1.0, 0.0)}] * 2)
    assert norm and "clip returned norm 0" in norm[0]


@pytest.mark.distributed
@pytest.mark.skipif(
    not os.environ.get("DISTOPT_DIFF_MINUTES"), reason="long mode: set DISTOPT_DIFF_MINUTES"
)
def test_long_mode():
    minutes = float(os.environ["DISTOPT_DIFF_MINUTES"])
    res = diffrun.long_mode(minutes, log=lambda s: print(s, flush=True))
    print(
        f"[diffgen] long mode: programs tried per world size {res['tried']}, seeds up to {res['last_seed']}"
    )
    assert not res["failures"], "\n\n".join(res["failures"])
