"""Two nodes on one machine: ``launch/train.sh`` in two network namespaces joined by a capped
veth link (``tests/netns.py``), exactly the command a user runs on two real nodes.

* hybrid ZeRO-2 (shard within a node, replicate across nodes) sends at most half of flat
  ZeRO-2's bytes across the link, counted on the veth device, and both end with the parameters
  of single-process training;
* a node failure under elastic torchrun (``NNODES=1:2``): every process of node 1 is killed
  mid-run; node 0 continues from the newest complete checkpoint at world size 1 and ends equal
  to an uninterrupted run that switched from 2 ranks to 1 at the same step;
* the harness removes its namespaces, links and processes also when a test fails.

They need root (``ip netns``), as in CI; elsewhere they skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.netns import TwoNodes, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SH = ROOT / "launch" / "train.sh"
TRAIN_PY = ROOT / "examples" / "train.py"
REASON = unavailable_reason()
needs_netns = pytest.mark.skipif(
    REASON is not None, reason=f"two-node tests need network namespaces: {REASON}"
)
LAUNCH_TIMEOUT = float(os.environ.get("DISTOPT_MULTINODE_TIMEOUT", "420"))
# a model of ~0.11M parameters: its gradient (0.44 MB) dominates what crosses the link per step
MODEL = ["--d-model", "64", "--n-layer", "2", "--n-head", "2", "--seq-len", "32"]
COMMON = ["--warmup-steps", "1", "--log-every", "100", "--no-progress"]


@pytest.fixture
def make_nodes():
    """``make_nodes(rate_mbit, delay_ms)`` -> open :class:`TwoNodes`; all closed at teardown."""
    made: list[TwoNodes] = []

    def make(rate_mbit=None, delay_ms=None) -> TwoNodes:
        nodes = TwoNodes(rate_mbit=rate_mbit, delay_ms=delay_ms)
        made.append(nodes)
        nodes.open()
        return nodes

    yield make
    for nodes in made:
        nodes.close()
        assert not nodes.exists(), f"namespaces {nodes.namespaces} were not removed"


def _env(nodes: TwoNodes, node: int, **extra: str) -> dict[str, str]:
    return nodes.node_env(
        node,
        OMP_NUM_THREADS="1",
        DISTOPT_PYTHON=sys.executable,
        PYTHONPATH=str(ROOT),
        MASTER_PORT="29500",
        RDZV_ID="distopt-test",
        **extra,
    )


def _start(nodes: TwoNodes, node: int, log: Path, args: list[str], **env: str) -> subprocess.Popen:
    with open(log, "w", encoding="utf-8") as out:
        return nodes.popen(
            node,
            ["bash", str(TRAIN_SH), *args],
            env=_env(nodes, node, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        tails = "\n".join(f"--- node {i} (exit {rc}) ---\n{_tail(logs[i])}" for i, rc in bad)
        raise AssertionError(f"launch failed or hung after {timeout:.0f}s:\n{tails}")


def _tail(path: Path, n: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    lines = [ln for ln in text.splitlines() if not ln.startswith(("frame #", "  "))]
    return "\n".join(lines)[-n:]


def _two_node_run(nodes: TwoNodes, tmp: Path, name: str, args: list[str], **env: str) -> dict:
    """train.sh on both nodes; returns the final parameters and the link bytes per step."""
    stats = tmp / f"{name}.stats"
    logs = [tmp / f"{name}.node{i}.log" for i in range(2)]
    argv = [*args, "--step-stats", str(stats), "--final-state", str(tmp / f"{name}.pt")]
    procs = [_start(nodes, i, logs[i], argv, NNODES="2", **env) for i in range(2)]
    _wait(procs, logs)
    per_node = []
    for i in range(2):
        recs = [json.loads(line) for line in Path(f"{stats}.node{i}").read_text().splitlines()]
        tx = [r["tx_bytes"][nodes.veths[i]] for r in recs]  # KeyError: not the veth's counter
        per_node.append((tx[-1] - tx[0]) / (len(recs) - 1))
    return {
        "params": torch.load(tmp / f"{name}.pt"),
        "bytes_per_step": sum(per_node),
        "log": logs[0].read_text(errors="replace"),
    }


def _single_process(tmp: Path, args: list[str]) -> dict[str, torch.Tensor]:
    out = tmp / "single.pt"
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), *args, "--final-state", str(out)],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def _assert_params_close(got: dict, want: dict, what: str, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys()
    errs = {k: float((got[k] - want[k]).abs().max()) for k in want}
    bad = {
        k: e for k, e in errs.items() if not torch.allclose(got[k], want[k], rtol=rtol, atol=atol)
    }
    assert not bad, f"{what}: parameters differ (max abs error per tensor): {bad}"


# ----------------------------------------------------------------------------- the harness


def test_accelerate_multinode_configs_load():
    """The multi-node Accelerate configs of docs/multinode.md, through Accelerate's own loader."""
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("multi-node.yaml", "fsdp2-hsdp.yaml"):
        cfg = load_config_from_file(str(ROOT / "launch" / "accelerate" / name))
        assert cfg.num_machines == 2 and cfg.rdzv_backend == "c10d", name
    pc = load_config_from_file(str(ROOT / "launch" / "accelerate" / "fsdp2-hsdp.yaml"))
    assert pc.parallelism_config["parallelism_config_dp_replicate_size"] == 2
    assert pc.fsdp_config["fsdp_version"] == 2


@needs_netns
def test_harness_removes_everything_when_a_test_fails():
    nodes = TwoNodes(rate_mbit=100, delay_ms=1)
    with pytest.raises(RuntimeError, match="simulated test failure"), nodes:
        sleepers = [nodes.popen(i, ["sleep", "300"]) for i in range(2)]
        # the link works and is counted: node 1 sends node 0 a few packets
        before = nodes.tx_bytes(1)
        nodes.run(
            1,
            [
                sys.executable,
                "-c",
                "import socket; s = socket.socket(socket.AF_INET, "
                "socket.SOCK_DGRAM); s.sendto(b'x' * 1000, ('node0', 9))",
            ],
        )
        assert nodes.tx_bytes(1) - before >= 1000
        assert nodes.pids(0) and nodes.pids(1)
        assert "rate 100mbit" in nodes.shaping
        raise RuntimeError("simulated test failure")
    assert not nodes.exists()
    assert all(p.poll() is not None for p in sleepers)
    assert not any(Path(f"/etc/netns/{ns}").exists() for ns in nodes.namespaces)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not any(v in links for v in nodes.veths)


# ------------------------------------------------------------------------- hybrid sharding


@pytest.mark.distributed
@needs_netns
def test_hybrid_zero2_halves_the_bytes_across_the_link(make_nodes, tmp_path):
    """2 nodes x 2 processes: flat ZeRO-2 (one group of 4) vs hybrid ZeRO-2 (shard within a
    node, replicate across): hybrid sends <= 1/2 of flat's bytes over the veth per step, and
    both end where single-process training on the whole batch ends."""
    nodes = make_nodes(rate_mbit=400)
    # SGD: Adam-type updates turn the rounding noise of exactly-zero gradients (the attention's
    # key bias) into lr-sized steps, which no tolerance separates from a real difference
    steps = ["--max-steps", "4", "--batch-size", "2", "--optim", "sgd", "--lr", "0.1"]
    flat = _two_node_run(
        nodes, tmp_path, "flat", [*MODEL, *COMMON, *steps, "--zero", "2"], NPROC="2"
    )
    hybrid = _two_node_run(
        nodes, tmp_path, "hybrid", [*MODEL, *COMMON, *steps, "--zero", "2", "--hybrid"], NPROC="2"
    )
    assert "chars; hybrid zero-2, world size 4" in hybrid["log"], _tail(
        tmp_path / "hybrid.node0.log"
    )
    assert "chars; zero-2, world size 4" in flat["log"], _tail(tmp_path / "flat.node0.log")

    grad_bytes = 4 * sum(t.numel() for t in flat["params"].values())
    # flat ZeRO-2 moves the whole gradient across the link each step, in each direction
    assert flat["bytes_per_step"] >= 2 * grad_bytes, (flat["bytes_per_step"], grad_bytes)
    ratio = hybrid["bytes_per_step"] / flat["bytes_per_step"]
    # Payload: flat ZeRO-2 on gloo reduces and gathers with all-to-all (each rank sends each peer
    # only that peer's part, as a ring reduce-scatter would), so half of every rank's gradient
    # crosses the link each way; hybrid sends only its node shard's replica all-reduce across:
    # exactly half of flat's payload.  What the veth counts on top does not halve and varies
    # from run to run: packet headers (~0.5% here: GSO packets), the small messages of gloo's
    # and the store's own protocol, and (not verified) TCP retransmissions when the capped link
    # drops packets: measured 0.503 to 0.521 over five runs, so the bound is 0.55.  (Before the all-to-all
    # path flat ZeRO-2 all-reduced the whole buffer, and the ratio was 0.44.)
    assert ratio <= 0.55, (
        f"hybrid ZeRO-2 sent {hybrid['bytes_per_step']:.0f} B/step over the link, flat ZeRO-2 "
        f"{flat['bytes_per_step']:.0f} B/step: ratio {ratio:.3f} > 0.55"
    )

    single = _single_process(
        tmp_path, [*MODEL, *COMMON, *steps[:2], "--batch-size", "8", *steps[4:]]
    )
    _assert_params_close(hybrid["params"], single, "hybrid ZeRO-2 vs one process", 1e-5, 1e-6)
    _assert_params_close(flat["params"], single, "flat ZeRO-2 vs one process", 1e-5, 1e-6)


# ----------------------------------------------------------------------------- node failure

FAIL_RUN = [
    *["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "32"],
    *COMMON,
    "--lr",
    "1e-2",
    "--batch-size",
    "4",
    "--max-steps",
    "12",
    "--save-every",
    "3",
    "--keep-last",
    "10",
    "--zero",
    "2",
]


@pytest.mark.distributed
@needs_netns
def test_node_failure_continues_at_the_smaller_world_size(make_nodes, tmp_path):
    """Elastic torchrun (NNODES=1:2, MAX_RESTARTS=1), one process per node.  Once the step-3
    checkpoint is committed, every process of node 1 is SIGKILLed; node 0's worker fails,
    torchrun re-forms the job with node 0 alone and it resumes from the newest complete
    checkpoint at world size 1.  The final parameters equal those of an uninterrupted run that
    trained on 2 ranks up to that checkpoint's step and on 1 rank after it."""
    nodes = make_nodes(rate_mbit=20)
    save = tmp_path / "ckpt"
    logs = [tmp_path / f"fail.node{i}.log" for i in range(2)]
    args = [*FAIL_RUN, "--save-dir", str(save), "--final-state", str(tmp_path / "fail.pt")]
    env = dict(NNODES="1:2", NPROC="1", MAX_RESTARTS="1", RDZV_CONF="last_call_timeout=10")
    # node 1 first: it waits for node 0's rendezvous store, so both join the first round
    procs = [None, _start(nodes, 1, logs[1], args, **env)]
    procs[0] = _start(nodes, 0, logs[0], args, **env)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (save / "step-3").is_dir():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise AssertionError(
                "no step-3 checkpoint before the runs ended:\n" + "\n".join(_tail(f) for f in logs)
            )
        time.sleep(0.01)
    killed = nodes.kill_node(1)
    assert len(killed) >= 2, killed  # torchrun's agent and its worker (at least)
    _wait([procs[0]], [logs[0]])
    log = logs[0].read_text(errors="replace")
    both = log + logs[1].read_text(errors="replace")
    assert "world size 2" in both, _tail(logs[0])  # the first attempt spanned both nodes
    m = re.search(r"resumed from \S*step-(\d+) at step (\d+)", log)
    assert m, f"node 0 did not resume from a checkpoint:\n{_tail(logs[0])}"
    k = int(m.group(1))
    assert 3 <= k < 12 and "world size 1" in log, _tail(logs[0])

    # the uninterrupted reference: 2 ranks (one machine, loopback) up to step k, then 1 rank
    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(TRAIN_PY),
            *FAIL_RUN,
            "--save-dir",
            str(tmp_path / "ref2"),
        ],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    shutil.copytree(tmp_path / "ref2" / f"step-{k}", tmp_path / "ref1" / f"step-{k}")
    one = subprocess.run(
        [
            sys.executable,
            str(TRAIN_PY),
            *FAIL_RUN,
            "--save-dir",
            str(tmp_path / "ref1"),
            "--resume",
            "--final-state",
            str(tmp_path / "ref.pt"),
        ],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert one.returncode == 0 and f"step-{k} at step {k}" in one.stderr, one.stderr[-3000:]
    _assert_params_close(
        torch.load(tmp_path / "fail.pt"),
        torch.load(tmp_path / "ref.pt"),
        f"node failure at step {k} vs the uninterrupted switch",
        0,
        1e-6,
    )
