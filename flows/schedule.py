"""Scheduled retraining: the pipeline as a Prefect deployment with a cron schedule.

``graftline schedule`` (or ``python -m flows.schedule``) serves it from this process;
``prefect.yaml`` declares the same deployment for ``prefect deploy`` with a work pool.
Each run re-reads the configured data sources (new data under ``data/raw`` makes DVC
re-run what depends on it), runs the pipeline, gates and promotes, and pushes data and
models to the DVC remote.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import serve

from flows.pipeline import pipeline

DEPLOYMENT = "scheduled-retraining"


def retraining_deployment(
    cron: str, name: str = DEPLOYMENT, root: str = ".", params: str = "params.yaml"
) -> Any:
    """The deployment object: the pipeline with deploy and push on, on a cron schedule."""
    return pipeline.to_deployment(
        name=name,
        cron=cron,
        parameters={
            "root": str(Path(root).resolve()),
            "params": params,
            "deploy_model": True,
            "push_artifacts": True,
        },
        description="Retrain on the configured data, gate against the champion, promote, "
        "and push data and models to the DVC remote.",
        tags=["graftline", "retraining"],
    )


def serve_retraining(
    cron: str, name: str = DEPLOYMENT, root: str = ".", params: str = "params.yaml"
) -> None:
    """Register the deployment and run its scheduled (and triggered) runs until stopped."""
    serve(retraining_deployment(cron, name, root, params))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cron", default="0 3 * * 1")
    ap.add_argument("--name", default=DEPLOYMENT)
    args = ap.parse_args()
    serve_retraining(args.cron, args.name)
