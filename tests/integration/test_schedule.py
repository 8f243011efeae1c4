"""Scheduled retraining against a real `prefect server start` on loopback: the deployment is
registered with its cron schedule, a run triggered through the API completes, promotes a
champion and pushes data and models to the DVC remote."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, make_repo, prefect_server, tool_env

CRON = "15 4 * * 2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


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
