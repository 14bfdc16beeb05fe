"""Two simulated nodes on one machine: two network namespaces joined by a veth pair.

Used by ``distopt bench zero --nodes 2`` and the multi-node tests (``tests/netns.py``)::

    from distopt.bench._netns import TwoNodes, unavailable_reason

    with TwoNodes(rate_mbit=200, delay_ms=1) as nodes:     # torn down on exit, also on errors
        procs = [nodes.popen(i, ["bash", "launch/train.sh", ...], env=nodes.node_env(i, ...))
                 for i in range(2)]
        ...
        nodes.tx_bytes(0)                                  # bytes node 0 sent over the link

Each namespace has its own loopback and one end of the veth pair, with a private address that
exists only inside these namespaces (``10.231.0.1`` for node 0, ``10.231.0.2`` for node 1):
nothing is routed outside, and two harnesses running at once do not see each other (addresses
are per namespace; names carry the creating process id and a random token).  Processes started
with :meth:`TwoNodes.popen` run inside a namespace with the host's filesystem (so the
repository's ``.venv`` works there), in a UTS namespace of their own whose host name is the
node's name (``node0``/``node1``, resolvable on both nodes through ``/etc/netns/<ns>/hosts``),
as on real machines: ``MASTER_ADDR=node0`` makes torchrun on node 0 host the rendezvous store.  Traffic between two processes of one node goes over that
node's loopback; only traffic between the nodes crosses the veth link, whose byte counters
(``/sys/class/net/<veth>/statistics/tx_bytes`` inside the namespace) measure it.

The link can be capped with ``tc``: bandwidth always (netem's ``rate``, else a token bucket
``tbf``), latency where the kernel has ``sch_netem`` (:attr:`TwoNodes.shaping` says what was
applied).  :meth:`TwoNodes.close` kills every process left in the namespaces and deletes them
(which deletes the veth pair); namespaces left behind by a harness whose process died are
removed the next time a harness starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TwoNodes", "unavailable_reason"]

log = logging.getLogger("distopt.bench.netns")

PREFIX = "dto"  # every namespace and veth this harness makes starts with it
SUBNET = "10.231.0"  # addresses exist only inside the two namespaces


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def unavailable_reason() -> str | None:
    """Why two namespaces cannot be made here (None when they can): checked by trying."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root, as CI does"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    name = f"{PREFIX}{os.getpid()}p{secrets.token_hex(2)}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"`ip netns add` failed: {probe.stderr.strip() or probe.returncode}"
    try:
        veth = _ip(
            "link",
            "add",
            f"{name}v",
            "netns",
            name,
            "type",
            "veth",
            "peer",
            "name",
            f"{name}w",
            "netns",
            name,
            check=False,
        )
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def _remove_stale() -> None:
    """Delete namespaces of this harness whose creating process no longer exists."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        m = re.match(r"(\d+)x", name[len(PREFIX) :])
        digits = m.group(1) if m else ""
        if digits and not os.path.exists(f"/proc/{digits}"):
            _kill_pids(name)
            _ip("netns", "del", name, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
            log.warning("removed namespace %s left behind by process %s", name, digits)


def _kill_pids(ns: str, sig: int = signal.SIGKILL) -> list[int]:
    pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


class TwoNodes:
    """Two network namespaces ("nodes" 0 and 1) joined by a (capped) veth link.

    Args:
        rate_mbit: bandwidth of the link in each direction (None: uncapped).
        delay_ms: one-way latency added in each direction (needs ``sch_netem``; without it the
            delay is not applied and :attr:`shaping` says so).
    """

    def __init__(self, rate_mbit: float | None = None, delay_ms: float | None = None) -> None:
        if rate_mbit is not None and not rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0 or None, got {rate_mbit!r}")
        if delay_ms is not None and not delay_ms >= 0:
            raise ValueError(f"delay_ms must be >= 0 or None, got {delay_ms!r}")
        token = f"{os.getpid()}x{secrets.token_hex(2)}"
        self.namespaces = (f"{PREFIX}{token}a", f"{PREFIX}{token}b")
        # interface names are at most 15 characters
        self.veths = (f"{PREFIX}{token[-9:]}A"[-15:], f"{PREFIX}{token[-9:]}B"[-15:])
        self.addresses = (f"{SUBNET}.1", f"{SUBNET}.2")
        self.hostnames = ("node0", "node1")
        self.rate_mbit, self.delay_ms = rate_mbit, delay_ms
        self.shaping: str = "uncapped"
        self._procs: list[subprocess.Popen] = []
        self._up = False

    # ------------------------------------------------------------------ set-up / teardown
    def __enter__(self) -> TwoNodes:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"cannot create network namespaces: {reason}")
        _remove_stale()
        try:
            a, b = self.namespaces
            va, vb = self.veths
            _ip("netns", "add", a)
            self._up = True
            _ip("netns", "add", b)
            _ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
            hosts = "127.0.0.1 localhost\n" + "".join(
                f"{addr} {name}\n" for addr, name in zip(self.addresses, self.hostnames)
            )
            for ns in self.namespaces:  # `ip netns exec` bind-mounts these over /etc/...
                os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
                with open(f"/etc/netns/{ns}/hosts", "w", encoding="utf-8") as f:
                    f.write(hosts)
            for ns, veth, addr in zip(self.namespaces, self.veths, self.addresses):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", veth, "up")
            self.cap(self.rate_mbit, self.delay_ms)
        except BaseException:
            self.close()
            raise

    def cap(self, rate_mbit: float | None, delay_ms: float | None) -> str:
        """(Re)shape both directions of the link; returns a description of what was applied."""
        parts = []
        for ns, veth in zip(self.namespaces, self.veths):
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", veth, "root"],
                capture_output=True,
                stdin=subprocess.DEVNULL,
            )
            if rate_mbit is None and not delay_ms:
                parts = ["uncapped"]
                continue
            netem = ["netem"]
            if delay_ms:
                netem += ["delay", f"{delay_ms}ms"]
            if rate_mbit is not None:
                netem += ["rate", f"{rate_mbit}mbit"]
            tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", veth, "root"]
            done = subprocess.run(
                tc + netem, capture_output=True, text=True, stdin=subprocess.DEVNULL
            )
            if done.returncode == 0:
                parts = [" ".join(netem[1:])]
                continue
            if rate_mbit is None:
                parts = [f"uncapped (no netem for a {delay_ms} ms delay: {done.stderr.strip()})"]
                continue
            # token bucket: bandwidth only; the burst must hold one 64 KiB GSO segment
            burst = max(65536 * 2, int(rate_mbit * 1e6 / 8 / 250))
            tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]
            subprocess.run(tc + tbf, check=True, capture_output=True, stdin=subprocess.DEVNULL)
            parts = [
                f"rate {rate_mbit}mbit (tbf)"
                + (f"; no netem, so no {delay_ms} ms delay" if delay_ms else "")
            ]
        self.rate_mbit, self.delay_ms = rate_mbit, delay_ms
        self.shaping = parts[0] if parts else "uncapped"
        return self.shaping

    def close(self) -> None:
        """Kill every process in the namespaces and delete them (and so the veth pair)."""
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        if self._up:
            for ns in self.namespaces:
                for _ in range(50):
                    if not _kill_pids(ns):
                        break
                    time.sleep(0.05)
                _ip("netns", "del", ns, check=False)
        for ns in self.namespaces:
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        for p in self._procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        self._procs.clear()
        self._up = False

    def exists(self) -> bool:
        """Whether any of this harness's namespaces still exists (False after close)."""
        listed = _ip("netns", "list", check=False).stdout.split()
        return any(ns in listed for ns in self.namespaces)

    # ------------------------------------------------------------------ running things
    def node_env(
        self, node: int, base: Mapping[str, str] | None = None, **extra: str
    ) -> dict[str, str]:
        """Environment for a launcher on ``node``: rendezvous at node 0, gloo over the link."""
        env = dict(os.environ if base is None else base)
        env.update(
            GLOO_SOCKET_IFNAME=self.veths[node],
            NCCL_SOCKET_IFNAME=self.veths[node],
            MASTER_ADDR=self.hostnames[0],
            NODE_RANK=str(node),
            DISTOPT_NODE_IFACE=self.veths[node],
        )
        env.update(extra)
        return env

    def _wrap(self, node: int, cmd: Sequence[str]) -> list[str]:
        """``cmd`` inside ``node``'s network namespace, with the node's own host name."""
        return [
            "ip",
            "netns",
            "exec",
            self.namespaces[node],
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.hostnames[node],
            *cmd,
        ]

    def popen(self, node: int, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``cmd`` on ``node`` (its own session, so it can be killed whole)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self._wrap(node, cmd), start_new_session=True, **kwargs)
        self._procs.append(p)
        return p

    def run(self, node: int, cmd: Sequence[str], timeout: float = 30) -> str:
        """Run a short command in ``node``'s namespace and return its stdout."""
        return subprocess.run(
            self._wrap(node, cmd),
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        ).stdout

    def pids(self, node: int) -> list[int]:
        """Every process running in ``node``'s namespace."""
        out = _ip("netns", "pids", self.namespaces[node], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill_node(self, node: int) -> list[int]:
        """SIGKILL every process of ``node`` (a node failure); returns the pids killed."""
        killed: list[int] = []
        for _ in range(50):
            pids = _kill_pids(self.namespaces[node])
            if not pids:
                break
            killed += pids
            time.sleep(0.05)
        return sorted(set(killed))

    def tx_bytes(self, node: int) -> int:
        """Bytes ``node`` has sent over the link (its veth's ``tx_bytes`` counter)."""
        path = f"/sys/class/net/{self.veths[node]}/statistics/tx_bytes"
        return int(self.run(node, ["cat", path]).strip())
