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
import logging
import sys

import psutil

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
