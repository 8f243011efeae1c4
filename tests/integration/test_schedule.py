"""Scheduled retraining.

- With nothing else running, `graftline schedule --every 10s` fires by itself: its own
  Prefect server schedules runs, a run completes, registers and promotes a model; it stops
  cleanly on SIGTERM, leaves the schedule on, and fires again after a restart.
  Its runs push data and models to the DVC remote.
- Against a real `prefect server start` (PREFECT_API_URL set), the deployment is registered
  there with its cron schedule, and no server of the command's own is started.
"""

from __future__ import annotations

import copy
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.conftest import (
    TINY_PARAMS,
    dvc,
    make_repo,
    prefect_server,
    seed_prefect_home,
    tool_env,
)

CRON = "15 4 * * 2"
DEPLOYMENT = "graftline-pipeline/scheduled-retraining"
SERVER_LINE = re.compile(r"Prefect server with its scheduler on (http://127\.0\.0\.1:(\d+)/api)")


class Scheduling:
    """`graftline schedule --every 10s` as a command, with its output in a file.

    An interval this short keeps the test quick (a cron schedule fires once a minute at most);
    runs that come due while one runs wait ("Late") and start one after another."""

    def __init__(self, repo: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "graftline.cli", "schedule", "--every", "10s"],
                cwd=repo,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.api_url, self.port = self._server()

    def _server(self) -> tuple[str, int]:
        deadline = time.time() + 120
        while time.time() < deadline:
            found = SERVER_LINE.search(self.log.read_text())
            if found:
                return found.group(1), int(found.group(2))
            if self.proc.poll() is not None:
                raise AssertionError(self.log.read_text())
            time.sleep(0.5)
        raise AssertionError(f"no server line:\n{self.log.read_text()}")

    def scheduled_run(
        self, after: datetime, ready: Callable[[Any], bool], seconds: float = 300
    ) -> Any:
        """The first run of the deployment that started after ``after`` and is ``ready``;
        nothing here triggers a run: the scheduler must make it."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
        from prefect.settings import PREFECT_API_URL, temporary_settings

        only_ours = DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT.split("/")[1]]))
        deadline = time.time() + seconds
        with (
            temporary_settings(updates={PREFECT_API_URL: self.api_url}),
            get_client(sync_client=True) as client,
        ):
            while time.time() < deadline:
                assert self.proc.poll() is None, self.log.read_text()[-4000:]
                for run in client.read_flow_runs(deployment_filter=only_ours):
                    if run.start_time is not None and run.start_time > after and ready(run):
                        return run
                time.sleep(2)
        raise AssertionError(f"no scheduled run got ready:\n{self.log.read_text()[-4000:]}")

    def stage_processes(self, stage: str) -> list[psutil.Process]:
        return [
            p
            for p in psutil.Process(self.proc.pid).children(recursive=True)
            if f"tasks.{stage}" in " ".join(p.cmdline())
        ]

    def stop(self) -> str:
        """SIGTERM, as a service manager stops it; every process it started must end."""
        tree = [self.proc, *psutil.Process(self.proc.pid).children(recursive=True)]
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=90) == 0, self.log.read_text()[-4000:]
        _, alive = psutil.wait_procs(tree[1:], timeout=10)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", self.port)) != 0, "the server still answers"
        return self.log.read_text()


def _deployment_paused(home: Path) -> bool:
    """Whether the deployment's schedule is off, read from Prefect's database in ``home``
    (its `deployment` and `deployment_schedule` tables) while no server runs: a
    server started only to ask would cost ~7 s of CPU, and `serve` re-activates the schedule
    when it starts, so the restarted command cannot be asked instead."""
    flow, name = DEPLOYMENT.split("/")
    db = sqlite3.connect(home / "prefect.db")
    try:
        rows = db.execute(
            "SELECT d.paused, s.active FROM deployment d JOIN flow f ON d.flow_id = f.id"
            " LEFT JOIN deployment_schedule s ON s.deployment_id = d.id"
            " WHERE f.name = ? AND d.name = ?",
            (flow, name),
        ).fetchall()
    finally:
        db.close()
    assert rows, f"no deployment {DEPLOYMENT} in {home / 'prefect.db'}"
    return any(bool(paused) or not active for paused, active in rows)


def test_schedule_fires_by_itself_and_after_a_restart(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    params = copy.deepcopy(TINY_PARAMS)
    params["deploy"]["gate"]["min_accuracy"] = 0.0  # the first model becomes champion
    remote = tmp_path / "remote"
    remote.mkdir()
    repo = make_repo(tmp_path / "repo", params, remote)
    home = seed_prefect_home(tmp_path / "prefect-home")
    env = tool_env(repo, PREFECT_HOME=str(home))
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)

    started = datetime.now(UTC)
    first = Scheduling(repo, env, tmp_path / "first.log")
    try:
        run = first.scheduled_run(started, lambda r: r.state.is_completed())
    finally:
        console = first.stop()
    assert run.auto_scheduled, "the run was not made by the scheduler"
    # A healthy start-up and stop. (Not "no ERROR line": the next run, due while this one
    # ran, may have started just before the SIGTERM, and its cancellation is logged.)
    assert "Traceback" not in console, console[-4000:]
    assert "graftline schedule: stopped" in console

    # That run registered a model and promoted it: the champion carries its id.
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("tiny-digits", "champion")
    assert champion.tags["graftline.prefect_flow_run_id"] == str(run.id)
    assert champion.tags["graftline.gate.passed"] == "true"
    # And it pushed data and models to the DVC remote (the deployment's push_artifacts).
    assert any(remote.rglob("*")), "nothing pushed to the DVC remote"
    status = dvc(repo, env, "status", "--cloud")
    assert "in sync" in status.stdout, status.stdout + status.stderr

    # Stopping did not switch the schedule off (Prefect's serve pauses it by default).
    assert not _deployment_paused(home)

    # Restarted, it fires again by itself. This time pretraining has much more to do, and the
    # command is stopped while the stage trains: the stage process must go with it.
    params["pretrain"]["train"]["epochs"] = 2000
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    restarted = datetime.now(UTC)
    experiments = [e.experiment_id for e in client.search_experiments()]

    def training(run: Any) -> bool:  # the flow runs and the stage has its MLflow run open
        return (
            run.state.is_running()
            and bool(second.stage_processes("pretrain"))
            and bool(
                client.search_runs(
                    experiments,
                    "tags.`graftline.stage` = 'pretrain' and attributes.status = 'RUNNING'",
                )
            )
        )

    second = Scheduling(repo, env, tmp_path / "second.log")
    try:
        again = second.scheduled_run(restarted, training)
        stage = second.stage_processes("pretrain")
    finally:
        console = second.stop()
    assert again.auto_scheduled and again.id != run.id
    assert stage and not any(p.is_running() for p in stage)
    assert "Traceback" not in console, console[-4000:]

    # Nothing left RUNNING: the interrupted stage's run and the pipeline's ended KILLED.
    statuses = [
        (r.data.tags.get("graftline.stage"), r.info.status) for r in client.search_runs(experiments)
    ]
    assert not [s for s in statuses if s[1] == "RUNNING"], statuses
    assert ("pretrain", "KILLED") in statuses and ("pipeline", "KILLED") in statuses, statuses
    # The champion did not move.
    assert client.get_model_version_by_alias("tiny-digits", "champion").version == champion.version


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


def test_schedule_registers_its_cron_deployment_on_a_running_server(
    server: str, tmp_path: Path
) -> None:
    """With PREFECT_API_URL set, `graftline schedule` starts no server of its own: it serves
    the deployment on that one, with its cron schedule, pushing artifacts. (Its runs execute
    as the scheduled ones above do; the worker case runs API-triggered ones.)"""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = make_repo(tmp_path / "repo", TINY_PARAMS)
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
                    deployment = client.read_deployment_by_name(DEPLOYMENT)
                except Exception:
                    if serving.poll() is not None:
                        raise RuntimeError(log.read_text()) from None
                    time.sleep(1)
            assert deployment is not None, log.read_text()
            assert [s.schedule.cron for s in deployment.schedules] == [CRON]
            assert all(s.active for s in deployment.schedules)
            assert deployment.parameters["push_artifacts"] is True
    finally:
        serving.terminate()
        serving.wait(timeout=30)
    assert not SERVER_LINE.search(log.read_text()), "it started a server of its own"


def test_every_schedules_at_an_interval_and_bad_durations_are_refused() -> None:
    import argparse
    from datetime import timedelta

    from flows.schedule import retraining_deployment
    from graftline.cli import parse_every

    every = retraining_deployment("* * * * *", every=parse_every("10m"))
    assert [s.schedule.interval for s in every.schedules] == [timedelta(minutes=10)]
    assert parse_every("90") == timedelta(seconds=90) and parse_every("1.5h").seconds == 5400
    assert [s.schedule.cron for s in retraining_deployment(CRON).schedules] == [CRON]
    for bad in ("0", "-5m", "ten", "5x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="not a positive duration"):
            parse_every(bad)
    both = subprocess.run(
        [sys.executable, "-m", "graftline.cli", "schedule", "--every", "5m", "--cron", CRON],
        capture_output=True,
        text=True,
    )
    assert both.returncode == 2 and "not allowed with argument --every" in both.stderr
