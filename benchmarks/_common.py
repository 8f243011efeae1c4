"""Helpers shared by the benchmark scripts: a temporary copy of the repo and a shell."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }


def copy_repo(dest: Path | None = None) -> Path:
    """The files git would commit, in a new git repo (no dvc.lock, no outputs), with the
    repo's own params; the same helper the end-to-end tests use."""
    import yaml

    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_repo

    dest = dest or Path(tempfile.mkdtemp(prefix="graftline-bench-"))
    return make_repo(dest, yaml.safe_load((ROOT / "params.yaml").read_text()))


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=cwd, env={**env(), "PYTHONPATH": str(cwd)}, capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
