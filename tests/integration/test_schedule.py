"""Scheduled retraining against a real `prefect server start` on loopback: the deployment is
registered with its cron schedule, a run triggered through the API completes, promotes a
champion and pushes data and models to the DVC remote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, free_port, make_repo, tool_env

CRON = "15 4 * * 2"


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = home / "server.log"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(f"{url}/health", proc, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_scheduled_deployment_runs_through_the_api(server: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    remote = tmp_path / "remote"
    remote.mkdir()
    repo = make_repo(tmp_path / "repo", TINY_PARAMS, remote)
    log = tmp_path / "serve.log"
    env = tool_env(repo, PREFECT_API_URL=server, PREFECT_HOME=str(tmp_path / "home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        serving = subprocess.Popen(
            [sys.executable, "-m", "graftline.cli", "schedule", "--cron", CRON],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: server}),
            get_client(sync_client=True) as client,
        ):
            deadline = time.time() + 120
            deployment = None
            while deployment is None and time.time() < deadline:
                try:
                    deployment = client.read_deployment_by_name(
                        "graftline-pipeline/scheduled-retraining"
                    )
                except Exception:
                    if serving.poll() is not None:
                        raise RuntimeError(log.read_text()) from None
                    time.sleep(1)
            assert deployment is not None, log.read_text()
            assert [s.schedule.cron for s in deployment.schedules] == [CRON]
            assert deployment.parameters["push_artifacts"] is True

            run = client.create_flow_run_from_deployment(deployment.id)
            deadline = time.time() + 480
            while time.time() < deadline:
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    break
                time.sleep(2)
            assert state is not None and state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
    finally:
        serving.terminate()
        serving.wait(timeout=30)
    # The run really retrained, registered and pushed.
    assert (repo / "dvc.lock").exists() and (repo / "models/finetuned/model.pt").exists()
    assert any(remote.rglob("*")), "nothing pushed to the DVC remote"
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--cloud"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "in sync" in status.stdout
