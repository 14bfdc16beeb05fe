"""``CheckpointManager``: step-N folders, atomic commits, rotation, a ``latest`` pointer."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from distopt.checkpoint._async import wait
from distopt.checkpoint._common import CheckpointError, write_atomic_bytes
from distopt.checkpoint._save import save
from distopt.checkpoint._save_load import is_complete, load

log = logging.getLogger("distopt.checkpoint")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointManager:
    """Keeps the last ``keep_last`` committed checkpoints of a run under ``root``.

    ``maybe_save(step, ...)`` saves when ``step % every == 0``; ``save(step, ...)`` always does.
    Each checkpoint goes to ``root/step-<N>`` through :func:`distopt.checkpoint.save` (written to
    ``step-<N>.partial``, committed by a marker, then renamed), after which ``root/latest`` (a
    one-line text file, replaced atomically) names it and older checkpoints beyond ``keep_last``
    are deleted.  :meth:`latest` ignores incomplete folders and a stale or missing pointer, so a
    job killed at any moment resumes from the newest complete checkpoint.

    Args:
        root: the folder holding the checkpoints.
        keep_last: how many committed checkpoints to keep (default 3; None keeps all).
        every: save interval in steps for :meth:`maybe_save` (default 1).
        async_save: save asynchronously (``distopt.checkpoint.save(..., async_=True)``): each
            save takes a snapshot and returns, the files are written in the background, and the
            ``latest`` pointer moves (and rotation runs) only once every rank's files are
            committed.  The next save, :meth:`wait` and interpreter exit wait for it; a failure
            is raised there, on every rank.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        keep_last: int | None = 3,
        every: int = 1,
        async_save: bool = False,
    ):
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not isinstance(async_save, bool):
            raise ValueError(f"async_save must be True or False, got {async_save!r}")
        self.async_save = async_save
        self.root = Path(root)
        self.keep_last = keep_last
        self.every = every

    # ------------------------------------------------------------------ discovery
    def steps(self) -> list[int]:
        """Steps of the committed checkpoints under ``root``, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir() and is_complete(d):
                out.append(int(m.group(1)))
        return sorted(out)

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{int(step)}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None.  Incomplete folders are never returned."""
        pointer = self.root / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            cand = self.root / name
            if _STEP_DIR.match(name) and is_complete(cand):
                newest = self.steps()
                if not newest or int(_STEP_DIR.match(name).group(1)) >= newest[-1]:
                    return cand
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None

    # ------------------------------------------------------------------ save / load
    def maybe_save(self, step: int, **objects: Any) -> Path | None:
        """Save when ``step`` is a multiple of ``every``; returns the folder or None."""
        if step % self.every != 0:
            return None
        return self.save(step, **objects)

    def save(self, step: int, **objects: Any) -> Path:
        """Save ``objects`` (model=, optimizer=, scheduler=, accumulator=, extra=) as step ``step``.

        Returns the folder; with ``async_save`` it is complete only after :meth:`wait` (or the
        next save) returned."""
        wait()
        path = self.path_for(step)  # save's rank 0 creates the root with the folder
        on_stage = objects.get("_on_stage")

        def committed(path: Path) -> None:
            if on_stage is not None:
                on_stage("committed")
            self._committed(path)

        save(path, async_=self.async_save, _on_commit=committed, **objects)
        return path

    def wait(self) -> Path | None:
        """Wait for the asynchronous save in flight (if any); see :func:`distopt.checkpoint.wait`."""
        return wait()

    def _committed(self, path: Path) -> None:  # rank 0, after the rename
        write_atomic_bytes(self.root / "latest", (path.name + "\n").encode())
        self._rotate()

    def load_latest(self, fallback: bool = True, **objects: Any) -> Any:
        """Load the newest complete checkpoint into ``objects``; returns its ``extra`` or None
        when there is no checkpoint yet (a fresh start).

        With ``fallback`` (default), a checkpoint found damaged (unreadable marker or metadata,
        missing, truncated or corrupted files: ``CheckpointError.corrupt``) is skipped with a
        warning naming it and the cause, and the next older one is tried; the error is raised
        when none is left.  Errors that are not damage (the checkpoint does not fit the model)
        are raised at once.  Collective: every rank takes the same decision.
        """
        wait()
        candidates = [self.path_for(s) for s in reversed(self.steps())]
        latest = self.latest()
        if latest is not None and latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        if not candidates:
            return None
        first_err: CheckpointError | None = None
        for path in candidates:
            log.info("resuming from %s", path)
            try:
                return load(path, **objects)
            except CheckpointError as exc:
                if not (fallback and exc.corrupt):
                    raise
                first_err = first_err or exc
                log.warning("skipping damaged checkpoint %s: %s", path, exc)
        raise CheckpointError(
            f"every checkpoint under {self.root} is damaged ({len(candidates)} tried); newest: {first_err}",
            corrupt=True,
        )

    def _rotate(self) -> None:
        for d in self.root.iterdir():  # leftovers of interrupted saves
            if (
                d.is_dir()
                and d.name.endswith(".partial")
                and _STEP_DIR.match(d.name[: -len(".partial")])
            ):
                step = int(_STEP_DIR.match(d.name[: -len(".partial")]).group(1))
                if self.steps() and step < self.steps()[-1]:
                    shutil.rmtree(d, ignore_errors=True)
        if self.keep_last is None:
            return
        steps = self.steps()
        for s in steps[: -self.keep_last]:
            shutil.rmtree(self.path_for(s), ignore_errors=True)
