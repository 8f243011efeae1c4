"""What Prefect knows of the pipeline's runs: the latest one and the next scheduled one."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

FLOW_NAME = "graftline-pipeline"


def pipeline_runs(deployment: str = "scheduled-retraining") -> dict[str, Any]:
    """The latest finished or running flow run of the pipeline, the next scheduled one and
    the retraining deployment's schedule, from the Prefect API this process is pointed at."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.urls import url_for

    flows = FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))
    waiting = [StateType.SCHEDULED, StateType.PENDING]

    def describe(run: Any) -> dict[str, Any]:
        when = run.start_time or run.expected_start_time
        return {
            "id": str(run.id),
            "name": run.name,
            "state": run.state.name if run.state else "?",
            "time": when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if when else None,
            "url": url_for("flow-run", obj_id=run.id),
        }

    with get_client(sync_client=True) as client:
        done = client.read_flow_runs(
            flow_filter=flows,
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=waiting))
            ),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        upcoming = client.read_flow_runs(
            flow_filter=flows,
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=1,
        )
        try:
            dep = client.read_deployment_by_name(f"{FLOW_NAME}/{deployment}")
            schedule = {
                "deployment": f"{FLOW_NAME}/{deployment}",
                "paused": bool(dep.paused),
                "crons": [getattr(s.schedule, "cron", str(s.schedule)) for s in dep.schedules],
            }
        except ObjectNotFound:
            schedule = None
    return {
        "last_run": describe(done[0]) if done else None,
        "next_run": describe(upcoming[0]) if upcoming else None,
        "schedule": schedule,
        "checked": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
    }
