"""Keeping a long-running command's process tree whole: no descendant outlives it.

A stage process is a grandchild of the command that started the flow (flow process -> DVC ->
``python -m tasks.<stage>``). When a process in the middle dies, its children are handed to
init and nothing is left that knows about them. A command that marks itself a *child
subreaper* (Linux ``PR_SET_CHILD_SUBREAPER``) receives them instead, so that it can stop them
when it stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from graftline.errors import GraftlineError

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def stop_descendants(grace: float = 10.0, exclude: set[int] | None = None) -> list[int]:
    """SIGTERM every live descendant of this process, then SIGKILL those still alive after
    ``grace`` seconds. Returns the pids that had to be stopped."""
    exclude = exclude or set()
    try:
        procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in exclude]
    except psutil.Error:
        return []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    if procs:
        log.info("stopped %d leftover process(es): %s", len(procs), [p.pid for p in procs])
    return [p.pid for p in procs]


# One pipeline per checkout (flows.pipeline holds it; `graftline status` reads it).
PIPELINE_LOCK = Path(".graftline/pipeline.lock")


class Busy(GraftlineError):
    """Another process holds the lock this one needs."""


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, or raise :class:`Busy` at once,
    naming the process that holds it.

    The lock is the kernel's (``flock``), so it goes with the process however that ends
    (``kill -9`` included): a stale lock file never blocks the next run. The file is not
    inherited by child processes (Python opens files non-inheritable).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise Busy(
                f"{what} ({holder}; lock {path}): wait for it to finish or stop it"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield


def holder(path: Path) -> str | None:
    """Who holds the :func:`exclusive` lock on ``path`` now ("pid N, since ..."), or None."""
    if not path.exists():
        return None
    with path.open("r", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None
