"""What the fault cases that run the pipeline share: a pretraining long enough to be
interrupted, the environment of a `graftline run` on the session's Prefect server, and
probes of what a fault left behind (stage processes, MLflow run statuses)."""

from __future__ import annotations

import copy
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import TINY_PARAMS, tool_env

EPOCHS = 150  # pretraining long enough to be interrupted mid-way (~5 s on 2 cores)
PARAMS = copy.deepcopy(TINY_PARAMS)
PARAMS["pretrain"]["train"]["epochs"] = EPOCHS
# A smaller corpus than the tiny runs' 600 images: the epochs, not the images, are what
# makes it long enough to interrupt, and these cases pretrain it five times over.
PARAMS["preprocess"]["pretrain"]["limit"] = 300

# The session's Prefect server, set by the `fault_prefect_api` fixture (tests/faults/
# conftest.py): a `graftline run` would otherwise start and stop a temporary one each time
# (tests/integration/test_flow.py covers that).
PREFECT_API: dict[str, str] = {}


def env_for(repo: Path, home: Path, **extra: str) -> dict[str, str]:
    env = tool_env(repo, PREFECT_HOME=str(home), PREFECT_API_URL=PREFECT_API["url"], **extra)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        if key not in extra:
            env.pop(key, None)
    return env


def start_graftline(repo: Path, env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "graftline.cli", *args],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if re.search(pattern, log.read_text()):
            return
        assert proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared:\n{log.read_text()[-4000:]}")


def stage_processes(repo: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "tasks." in cmd and p.info["cwd"] == str(repo):
            found.append(p)
    return found


def mlflow_statuses(repo: Path) -> list[tuple[str | None, str]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [
        (r.data.tags.get("graftline.stage"), r.info.status)
        for r in client.search_runs(experiments, max_results=1000)
    ]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
