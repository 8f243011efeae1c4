"""Prefect in production: a process work pool on a real `prefect server start`, the deployment
from prefect.yaml, and `prefect worker start` executing runs triggered through the API, one
at a time (the deployment's concurrency limit of 1, collisions enqueued).

`-k worker` selects it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import TINY_PARAMS, make_repo, prefect_server, tool_env

DEPLOYMENT = "graftline-pipeline/scheduled-retraining"


def _prefect(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"prefect {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_worker_runs_api_triggered_runs_of_the_deployment_one_at_a_time(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = {**TINY_PARAMS, "deploy": {"model_name": "tiny-digits", "gate": {"min_accuracy": 0}}}
    repo = make_repo(tmp_path / "repo", params, tmp_path / "remote")
    # The enqueued run asks for the slot again every 3 s, not 30, and the worker looks for
    # work every 2 s, not 10: the same hand-over, less waiting.
    waits = {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3"}
    with prefect_server(tmp_path, **waits) as url:
        env = tool_env(
            repo,
            PREFECT_API_URL=url,
            PREFECT_HOME=str(tmp_path / "client-home"),
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_WORKER_PREFETCH_SECONDS="2",
            GRAFTLINE_REPO=str(repo),  # prefect.yaml's pull step: where the worker runs it
        )
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
            env.pop(key, None)
        _prefect(env, repo, "work-pool", "create", "graftline", "--type", "process")
        _prefect(env, repo, "deploy", "--name", "scheduled-retraining")
        log = tmp_path / "worker.log"
        with log.open("w") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "graftline"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            with (
                temporary_settings(updates={PREFECT_API_URL: url}),
                get_client(sync_client=True) as client,
            ):
                deployment = client.read_deployment_by_name(DEPLOYMENT)
                assert deployment.global_concurrency_limit is not None
                assert deployment.global_concurrency_limit.limit == 1
                assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
                runs = [client.create_flow_run_from_deployment(deployment.id) for _ in range(2)]
                deadline = time.time() + 420
                while time.time() < deadline:
                    states = [client.read_flow_run(r.id).state for r in runs]
                    if all(s is not None and s.is_final() for s in states):
                        break
                    assert worker.poll() is None, log.read_text()[-4000:]
                    time.sleep(2)
                done = [client.read_flow_run(r.id) for r in runs]
                assert [r.state.type.value for r in done] == ["COMPLETED", "COMPLETED"], (
                    [r.state for r in done],
                    log.read_text()[-4000:],
                )
                # One training at a time: the later run started after the earlier ended,
                # and waited for the slot on the way.
                first, second = sorted(done, key=lambda r: r.start_time)
                assert second.start_time >= first.end_time
                waited = [s.name for s in client.read_flow_run_states(second.id)]
                assert "AwaitingConcurrencySlot" in waited, waited
                only_ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                ran = [  # the rest are the weekly schedule's future runs
                    r
                    for r in client.read_flow_runs(deployment_filter=only_ours)
                    if r.state_type.value != "SCHEDULED"
                ]
                assert sorted(r.id for r in ran) == sorted(r.id for r in runs)
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a loaded machine: it need not stop gracefully
                worker.kill()
                worker.wait(timeout=30)
    assert (repo / "models/finetuned/model.pt").exists()
