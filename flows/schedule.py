"""Scheduled retraining: the pipeline as a Prefect deployment on a cron schedule (or every so
many seconds: ``every``).

``graftline schedule`` serves it from one process, against a Prefect server that runs the
scheduler service (it starts one when none is configured); ``prefect.yaml`` declares the same
deployment for ``prefect deploy`` with a work pool. Each run re-reads the configured data
sources (new data under ``data/raw`` makes DVC re-run what depends on it), runs the pipeline,
gates and promotes, and pushes data and models to the DVC remote.

Two choices differ from ``prefect.serve``'s defaults:

- the schedule stays on when serving stops (``pause_on_shutdown=False``; Prefect pauses it by
  default, and a paused deployment loses its scheduled runs, PrefectHQ/prefect#16363), and is
  switched on again when serving starts (``paused=False``);
- one run at a time (``limit=1``): two pipelines in one checkout would collide on DVC's lock.
  Runs whose time came while nothing served them (the machine was off) are still scheduled
  ("Late") and run one after another when serving resumes.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.exceptions import TerminationSignal
from prefect.runner import Runner
from prefect.schedules import Cron, Interval

from flows.pipeline import pipeline

DEPLOYMENT = "scheduled-retraining"

log = logging.getLogger("graftline.schedule")


def retraining_deployment(
    cron: str,
    name: str = DEPLOYMENT,
    root: str = ".",
    params: str = "params.yaml",
    timezone: str = "UTC",
    every: timedelta | None = None,
) -> Any:
    """The deployment object: the pipeline with deploy and push on, on the ``cron`` schedule,
    or, given ``every``, at that interval (from when it is registered)."""
    schedule = (
        Cron(cron, timezone=timezone) if every is None else Interval(every, timezone=timezone)
    )
    return pipeline.to_deployment(
        name=name,
        schedule=schedule,
        parameters={
            "root": str(Path(root).resolve()),
            "params": params,
            "deploy_model": True,
            "push_artifacts": True,
        },
        description="Retrain on the configured data, gate against the champion, promote, "
        "and push data and models to the DVC remote.",
        tags=["graftline", "retraining"],
        paused=False,
    )


class _Runner(Runner):
    """Prefect's runner, deaf to a second SIGTERM while it stops.

    A signal sent to the whole process group (``timeout``, some service managers) reaches this
    process twice; Prefect's runner answers the second with ``sys.exit`` inside its event
    loop, which prints a traceback and leaves the run it was cancelling behind.
    """

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        if self.stopping:
            return
        super().handle_sigterm(*args, **kwargs)


def serve_retraining(
    cron: str,
    name: str = DEPLOYMENT,
    root: str = ".",
    params: str = "params.yaml",
    timezone: str = "UTC",
    every: timedelta | None = None,
) -> None:
    """Register the deployment and run its scheduled (and triggered) runs until stopped
    (Ctrl-C or SIGTERM, which cancel a run in progress)."""
    deployment = retraining_deployment(cron, name, root, params, timezone, every)
    runner = _Runner(pause_on_shutdown=False, limit=1)
    runner.add_deployment(deployment)
    log.info(
        "serving %s/%s: %s (%s), one run at a time; run it now with "
        "`prefect deployment run '%s/%s'`",
        pipeline.name,
        name,
        f"cron {cron!r}" if every is None else f"every {every}",
        timezone,
        pipeline.name,
        name,
    )
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as exc:
        log.info("%s: stopping", type(exc).__name__)
