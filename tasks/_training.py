"""Pieces the training stages share: run fingerprints and learning-curve tables."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from graftline.io import write_text


def fingerprint(*parts: Any) -> str:
    """A stable id of ``parts`` (params, input hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_identity(*, params: Any, data: Any, start: Any = None, **more: Any) -> dict[str, str]:
    """What a training run's result depends on, each part named: its ``params``, its
    ``data`` (content hashes), the weights it ``start`` s from (the pretrained backbone's or
    the teacher's file hash) and the training loop's code. A resume checkpoint is taken up
    only by a run whose identity is the same, and a mismatch is reported by name."""
    from graftline.train import loop_version

    parts = {"params": params, "data": data, "starting weights": start, **more}
    return {k: fingerprint(v) for k, v in parts.items()} | {"training code": loop_version()}


def record_environment(checkpoints: Path, model: str, device: str) -> dict[str, str]:
    """Write what ``model``'s training ran on beside ``checkpoints`` (in
    ``.graftline/environment/<model>.json``: deploy tags the registered version with it), and
    tag the stage's MLflow run with it."""
    import mlflow

    from graftline.io import write_json
    from graftline.train import environment

    env = environment(device)
    write_json(checkpoints.parent / "environment" / f"{model}.json", env)
    if mlflow.active_run() is not None:
        mlflow.set_tags({f"graftline.env.{model}.{k}": v for k, v in env.items()})
    return env


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch learning curve as CSV (a DVC plot); wall-clock columns are left out so the
    file, and so ``dvc.lock``, is the same on every re-run."""
    df = pd.DataFrame(history).drop(columns=["seconds"], errors="ignore")
    write_text(path, df.to_csv(index=False, float_format="%.6g"))
