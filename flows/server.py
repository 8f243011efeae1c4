"""A Prefect server for the length of one ``graftline`` command, started early.

With no ``PREFECT_API_URL``, Prefect starts a temporary server itself on the flow's first API
call: it imports its server package in the client (~2 s) and then waits for the server to
boot (~3.5 s) before any work begins. ``graftline run`` instead starts the same server (Prefect's
own API app, with the flags its ephemeral mode uses) before it imports the flow, so the boot
overlaps the client's imports and MLflow's start-up, and the client never imports the server.

``graftline schedule`` needs more than an API: the scheduler service, which turns a
deployment's cron schedule into flow runs, runs only in a full server (Prefect's ephemeral
mode leaves it out). ``TemporaryServer(services=True)`` is what ``prefect server start`` runs
(the same app with every enabled service, and the UI), in a child process.

Either way it binds to 127.0.0.1, keeps Prefect's database (``PREFECT_HOME``), and stops when
the command exits, however it ends.
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
EPHEMERAL_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
# What `prefect server start` sets: every enabled service (the scheduler above all) and the
# UI, less two. Analytics: offline, the telemetry service only logs a traceback. Late runs:
# the service that renames past-due runs "Late" writes to SQLite from concurrent tasks and
# fails with "database is locked" (PrefectHQ/prefect#18934) for every missed run, every 5 s;
# the name is all it changes: the runner picks up past-due runs either way.
FULL_ENV = {
    "PREFECT_SERVER_UI_ENABLED": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT__SERVER_FINAL": "1",
}
# Where `graftline schedule` keeps its long-running server's own log (repo-relative): the
# services' housekeeping (SQLite retries included) belongs in a file, not on the console.
SERVER_LOG = Path(".graftline/logs/prefect-server.log")
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

    Args:
        port: the port to bind; a free one when not given.
        timeout: seconds ``wait()`` gives the server to answer.
        services: run Prefect's services (the scheduler above all) and the UI, as
            ``prefect server start`` does; otherwise only the API, as Prefect's ephemeral
            server does.
        log: a file that receives the server's own output (appended); otherwise it goes
            to this process's stdout and stderr.
    """

    def __init__(
        self,
        port: int | None = None,
        timeout: float = 60.0,
        services: bool = False,
        log: Path | None = None,
    ) -> None:
        self._fixed_port = port is not None
        self.port = port or _free_port()
        self.timeout = timeout
        self.services = services
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self._ready = False
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def process_id(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def ui_url(self) -> str | None:
        """Where Prefect's UI is, when this server serves one."""
        return f"http://127.0.0.1:{self.port}" if self.services else None

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
        env = {**os.environ, **(FULL_ENV if self.services else EPHEMERAL_ENV)}
        # The UI asks the API at the address these name.
        env |= {"PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(self.port)}
        env.pop("PREFECT_API_URL", None)
        out = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = self.log.open("ab")
        try:
            # A session of its own: a signal to the command's whole process group (Ctrl-C,
            # `timeout`, a service manager) stops the command, which then stops the server
            # after its last API calls, instead of the server dying under them.
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()  # the child holds its own copy
        return self

    def _log_tail(self, lines: int = 20) -> str:
        if self.log is None or not self.log.exists():
            return ""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"; the end of its log ({self.log}):\n" + "\n".join(tail)

    def wait(self) -> str:
        """Block until the API's health check answers; returns the API URL."""
        if self._ready:
            return self.api_url
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == PORT_IN_USE and self._fixed_port:
                raise ServerError(f"port {self.port} is already in use")
            if code == PORT_IN_USE:  # another process took the port meanwhile
                self.port = _free_port()
                self.start()
                continue
            if code is not None:
                raise ServerError(
                    f"the temporary Prefect server exited with status {code}{self._log_tail()}"
                )
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


def start_unless_configured(
    services: bool = False, port: int | None = None, log: Path | None = None
) -> TemporaryServer | None:
    """Start a temporary server unless one is configured: ``PREFECT_API_URL`` in the
    environment or in the active Prefect profile. Returns at once; ``connect`` waits.

    The server starts before Prefect's settings are read (they import much of Prefect), so
    that its boot overlaps them; a URL found in the profile then stops it unused.
    """
    # Prefect's server would send telemetry; offline that only logs a traceback.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_API_URL"):
        return None
    server = TemporaryServer(port=port, services=services, log=log).start()
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        server.stop()
        return None
    return server


def connect(server: TemporaryServer) -> str:
    """Wait for ``server`` and point this process's Prefect client (and its children) at it."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = server.wait()
    refresh_global_settings_context()  # for the flow and Prefect's exit handlers alike
    return server.api_url
