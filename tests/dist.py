"""Multi-process test harness (no ``torch.testing._internal``).

Import it as::

    from tests.dist import run_distributed, rank, world_size, device

(``tests/conftest.py`` puts the repository root on ``sys.path``, so this works from any test
module and inside the spawned children.)

``run_distributed(fn, world_size, *args, **kwargs)`` runs ``fn(*args, **kwargs)`` on
``world_size`` fresh processes (multiprocessing *spawn*), each with ``torch.distributed``
already initialised, and returns the list of their return values indexed by rank:

* ranks meet through a ``FileStore`` in a new temporary directory (no TCP ports, so any number
  of ``pytest -n auto`` workers can run distributed tests at once);
* backend: gloo on CPU, NCCL when ``torch.cuda.device_count() >= world_size`` (then rank ``r``
  uses ``cuda:r``); pass ``backend=`` to force one;
* children run with ``OMP_NUM_THREADS=1`` / ``torch.set_num_threads(1)``;
* ``fn`` must be a module-level (picklable) function; its arguments and return value must be
  picklable (tensors are fine: move them to CPU before returning if they live on a GPU);
* an exception on any rank raises :class:`DistributedTestError` carrying that rank's full
  traceback; a rank that dies without reporting (segfault, SIGKILL, ``os._exit``) is reported
  as soon as it is seen; a rank that hangs raises after ``timeout`` seconds naming the rank(s)
  that did not finish (with a stack dump of hung ranks where the platform allows); every child
  is killed before the call returns or raises, so no process outlives it.
* ``timeout`` counts from the moment every rank has joined the process group: start-up
  (spawning, importing torch, ``init_process_group``) takes from 3 s to well over 15 s on a
  busy 2-core machine and has its own bound, ``STARTUP_TIMEOUT`` seconds (default 300,
  environment variable ``DISTOPT_TEST_STARTUP_TIMEOUT``), so short test timeouts do not flake
  under ``pytest -n auto``.

Inside ``fn`` use :func:`rank`, :func:`world_size` and :func:`device`.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = [
    "DistributedTestError",
    "device",
    "rank",
    "run_distributed",
    "world_size",
]

MAX_WORLD_SIZE = 4
STARTUP_TIMEOUT = float(os.environ.get("DISTOPT_TEST_STARTUP_TIMEOUT", "300"))
_POLL_S = 0.02
# After one rank has failed, how long the others get to finish on their own before they are
# killed (they are usually blocked in a collective waiting for the failed rank).
_GRACE_AFTER_FAILURE_S = 2.0

# Set in each child before fn runs.
_RANK: int | None = None
_WORLD_SIZE: int | None = None
_DEVICE: Any = None


class DistributedTestError(AssertionError):
    """One or more ranks of a :func:`run_distributed` call failed, hung or died."""


def rank() -> int:
    """This process's rank (only valid inside a function run by :func:`run_distributed`)."""
    if _RANK is None:
        raise RuntimeError("rank() is only available inside run_distributed()")
    return _RANK


def world_size() -> int:
    """Number of ranks in the current :func:`run_distributed` call."""
    if _WORLD_SIZE is None:
        raise RuntimeError("world_size() is only available inside run_distributed()")
    return _WORLD_SIZE


def device():
    """``torch.device`` this rank should use: ``cuda:<rank>`` under NCCL, else ``cpu``."""
    if _DEVICE is None:
        raise RuntimeError("device() is only available inside run_distributed()")
    return _DEVICE


# --------------------------------------------------------------------------- child side


def _set_parent_death_signal() -> None:
    """Linux: the kernel SIGKILLs this child if the process that spawned it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # not Linux, or no libc symbol: best effort only
        pass


def _write_result(out_dir: str, r: int, payload: dict) -> None:
    path = os.path.join(out_dir, f"rank{r}.pkl")
    tmp = path + ".tmp"
    try:
        data = pickle.dumps(payload)
    except Exception:
        data = pickle.dumps(
            {
                "ok": False,
                "traceback": "return value (or exception) could not be pickled:\n"
                + traceback.format_exc(),
            }
        )
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _child_main(
    r: int,
    ws: int,
    tmp_dir: str,
    backend: str,
    pg_timeout_s: float,
    fn: Callable,
    args: tuple,
    kwargs: dict,
    pdeathsig: bool,
) -> None:
    global _RANK, _WORLD_SIZE, _DEVICE
    if pdeathsig:
        _set_parent_death_signal()
    os.environ["OMP_NUM_THREADS"] = "1"
    stack_file = open(os.path.join(tmp_dir, f"rank{r}.stack"), "w")  # noqa: SIM115
    if hasattr(signal, "SIGUSR1"):
        # The parent sends SIGUSR1 to a rank that hangs, to learn where it is stuck.
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    payload: dict
    initialised = False
    try:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        _RANK, _WORLD_SIZE = r, ws
        if backend == "nccl":
            torch.cuda.set_device(r)
            _DEVICE = torch.device("cuda", r)
        else:
            _DEVICE = torch.device("cpu")
        store = dist.FileStore(os.path.join(tmp_dir, "store"), ws)
        dist.init_process_group(
            backend,
            store=store,
            rank=r,
            world_size=ws,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        initialised = True
        # init_process_group returns on one rank before its peers have finished connecting;
        # without this barrier a rank that returns quickly can tear its sockets down under a
        # peer that is still in gloo's connectFullMesh.
        dist.barrier()
        open(os.path.join(tmp_dir, f"rank{r}.ready"), "w").close()
        result = fn(*args, **kwargs)
        payload = {"ok": True, "result": result}
    except BaseException:
        payload = {"ok": False, "traceback": traceback.format_exc()}
    _write_result(tmp_dir, r, payload)
    if initialised and payload["ok"]:
        # Only a rank that finished cleanly tears down its group, after all peers have
        # finished too (so nobody closes a connection a peer still uses); a failed rank just
        # exits, and the harness kills whoever still waits for it.
        try:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
        except Exception:
            pass


# --------------------------------------------------------------------------- parent side


def _default_backend(ws: int) -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= ws:
        return "nccl"
    return "gloo"


def _read_result(tmp_dir: str, r: int) -> dict | None:
    path = os.path.join(tmp_dir, f"rank{r}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _stack_dump(procs, tmp_dir: str, ranks: list[int]) -> dict[int, str]:
    """Ask hung ranks for a faulthandler stack dump (SIGUSR1) and collect it."""
    if not hasattr(signal, "SIGUSR1"):
        return {}
    for r in ranks:
        try:
            os.kill(procs[r].pid, signal.SIGUSR1)
        except (ProcessLookupError, TypeError):
            pass
    time.sleep(0.5)
    dumps = {}
    for r in ranks:
        try:
            with open(os.path.join(tmp_dir, f"rank{r}.stack")) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        if text:
            dumps[r] = text
    return dumps


def _kill_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)
    for p in procs:
        try:
            p.close()
        except ValueError:  # still running after SIGKILL (should not happen)
            pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Env:
    """Temporarily set environment variables (inherited by spawned children)."""

    def __init__(self, **values: str):
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str | None = None,
    **kwargs: Any,
) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` processes; return results by rank.

    Raises :class:`DistributedTestError` if any rank raises, dies or does not finish within
    ``timeout`` seconds (counted from the moment all ranks have joined the process group;
    start-up is bounded separately by ``STARTUP_TIMEOUT``).
    """
    import multiprocessing as mp

    if not isinstance(world_size, int) or not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ValueError(f"world_size must be an int in 1..{MAX_WORLD_SIZE}, got {world_size!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    qualname = getattr(fn, "__qualname__", "")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"run_distributed needs a module-level function (picklable), got {qualname!r}"
        )
    backend = backend or _default_backend(world_size)
    name = getattr(fn, "__name__", repr(fn))

    ctx = mp.get_context("spawn")
    tmp_dir = tempfile.mkdtemp(prefix="distopt-dist-")
    # Collectives give up on their own a little after the harness would have killed the rank.
    pg_timeout_s = max(timeout, STARTUP_TIMEOUT) + 30.0
    pdeathsig = threading.current_thread() is threading.main_thread()
    procs = []
    start = time.monotonic()
    deadline = start + STARTUP_TIMEOUT  # replaced by now + timeout once all ranks are ready
    run_start: float | None = None
    try:
        with _Env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"):
            for r in range(world_size):
                p = ctx.Process(
                    target=_child_main,
                    args=(
                        r,
                        world_size,
                        tmp_dir,
                        backend,
                        pg_timeout_s,
                        fn,
                        args,
                        kwargs,
                        pdeathsig,
                    ),
                    name=f"{name}-rank{r}",
                    daemon=True,
                )
                p.start()
                procs.append(p)

        results: dict[int, dict] = {}
        died: dict[int, int] = {}
        first_failure: float | None = None
        while True:
            for r, p in enumerate(procs):
                if r in results or r in died:
                    continue
                res = _read_result(tmp_dir, r)
                if res is not None:
                    results[r] = res
                    if not res["ok"] and first_failure is None:
                        first_failure = time.monotonic()
                elif not p.is_alive():
                    # It may have written its result between the two checks.
                    res = _read_result(tmp_dir, r)
                    if res is not None:
                        results[r] = res
                        if not res["ok"] and first_failure is None:
                            first_failure = time.monotonic()
                    else:
                        died[r] = p.exitcode
                        if first_failure is None:
                            first_failure = time.monotonic()
            done = len(results) + len(died) == world_size
            now = time.monotonic()
            if run_start is None and all(
                r in results or os.path.exists(os.path.join(tmp_dir, f"rank{r}.ready"))
                for r in range(world_size)
            ):
                run_start = now
                deadline = now + timeout
            if done or now >= deadline:
                break
            if first_failure is not None and now - first_failure >= _GRACE_AFTER_FAILURE_S:
                break
            time.sleep(_POLL_S)

        pending = [r for r in range(world_size) if r not in results and r not in died]
        errors = {r: res["traceback"] for r, res in results.items() if not res["ok"]}
        if not errors and not died and not pending:
            # Let the ranks tear down their process groups and exit by themselves.
            for p in procs:
                p.join(max(0.1, min(5.0, deadline - time.monotonic())))
            return [results[r]["result"] for r in range(world_size)]

        now = time.monotonic()
        timed_out = bool(pending) and not errors and not died
        stacks = _stack_dump(procs, tmp_dir, pending) if timed_out else {}
        lines = [f"run_distributed({name}, world_size={world_size}, backend={backend}) failed:"]
        for r in sorted(errors):
            lines.append(f"  rank {r} raised an exception")
        for r in sorted(died):
            lines.append(f"  rank {r} died without reporting a result ({_describe_exit(died[r])})")
        if pending:
            if timed_out and run_start is not None:
                lines.append(
                    f"  timeout after {now - run_start:.1f}s (timeout={timeout}s): rank(s) "
                    f"{', '.join(map(str, pending))} did not finish; killed"
                )
            elif timed_out:
                not_ready = [
                    r
                    for r in pending
                    if not os.path.exists(os.path.join(tmp_dir, f"rank{r}.ready"))
                ]
                lines.append(
                    f"  start-up timeout after {now - start:.1f}s (STARTUP_TIMEOUT="
                    f"{STARTUP_TIMEOUT}s): rank(s) {', '.join(map(str, not_ready))} did not "
                    "finish spawning, importing and init_process_group; killed"
                )
            else:
                lines.append(
                    f"  rank(s) {', '.join(map(str, pending))} did not finish "
                    "(killed after the failure above)"
                )
        for r in sorted(errors):
            lines.append(f"\n----- rank {r} traceback -----\n{errors[r].rstrip()}")
        for r in sorted(stacks):
            lines.append(f"\n----- rank {r} stack when killed -----\n{stacks[r]}")
        raise DistributedTestError("\n".join(lines))
    finally:
        _kill_all(procs)
        shutil.rmtree(tmp_dir, ignore_errors=True)
