"""A temporary Prefect server for one ``graftline run``, started early.

With no ``PREFECT_API_URL``, Prefect starts a temporary server itself on the flow's first API
call: it imports its server package in the client (~2 s) and then waits for the server to
boot (~3.5 s) before any work begins. ``graftline run`` instead starts the same server (Prefect's
own API app, with the flags its ephemeral mode uses) before it imports the flow, so the boot
overlaps the client's imports and MLflow's start-up, and the client never imports the server.
It binds to 127.0.0.1, keeps Prefect's database (``PREFECT_HOME``), and stops when the command
exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path

from graftline.errors import GraftlineError

# What Prefect's own temporary server sets (prefect.server.api.server.SubprocessASGIServer):
# no UI, the services an ephemeral server runs, and no further app in the process.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind

# `python -m uvicorn`, after asking Linux to send the server SIGTERM when its parent dies
# (prctl PR_SET_PDEATHSIG): a `graftline run` that is killed leaves no server behind. uvicorn
# shuts down cleanly on SIGTERM.
_STOP_WITH_PARENT = """\
import ctypes, os, runpy, signal, sys
PR_SET_PDEATHSIG = 1
parent = int(sys.argv.pop(1))
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
if os.getppid() != parent:  # the parent died before the line above
    sys.exit(0)
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


class ServerError(GraftlineError):
    """The temporary Prefect server did not start."""


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporaryServer:
    """Prefect's API server in a child process on a free loopback port.

    ``start()`` returns at once; ``wait()`` blocks until the API answers. The process stops at
    ``stop()`` or when this process exits, after Prefect's own exit handlers (registered
    later, so run earlier) have sent their last logs and events.
    """

    def __init__(self, port: int | None = None, timeout: float = 60.0) -> None:
        self.port = port or _free_port()
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._ready = False
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryServer:
        spec = find_spec("prefect")
        if spec is None or spec.origin is None:
            raise ServerError("prefect is not installed")
        if sys.platform == "linux":  # the server dies with this process, however it ends
            launch = [sys.executable, "-c", _STOP_WITH_PARENT, str(os.getpid())]
        else:  # pragma: no cover - elsewhere only a normal exit stops it (as Prefect's own)
            launch = [sys.executable, "-m", "uvicorn"]
        cmd = [
            *launch,
            "--app-dir",
            str(Path(spec.origin).parent.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        env = {**os.environ, **SERVER_ENV}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        return self

    def wait(self) -> str:
        """Block until the API's health check answers; returns the API URL."""
        if self._ready:
            return self.api_url
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == PORT_IN_USE:  # another process took the port meanwhile
                self.port = _free_port()
                self.start()
                continue
            if code is not None:
                raise ServerError(f"the temporary Prefect server exited with status {code}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        self._ready = True
                        return self.api_url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise ServerError(
            f"the temporary Prefect server on {self.api_url} did not answer within "
            f"{self.timeout:.0f} s"
        )

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
