"""MLflow runs for the stages, and the lineage every run and model version carries.

Nothing here runs at import. The tracking URI defaults to ``sqlite:///<repo>/mlflow.db``
and follows ``MLFLOW_TRACKING_URI`` when it is set. A stage started by the Prefect flow
finds its parent run id in ``GRAFTLINE_PARENT_RUN_ID`` (MLflow's active run does not cross
processes, so the flow passes it explicitly); under plain ``dvc repro`` each stage logs a
top-level run of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from graftline.errors import GraftlineError

PARENT_RUN_ENV = "GRAFTLINE_PARENT_RUN_ID"
FLOW_RUN_ENV = "GRAFTLINE_FLOW_RUN_ID"
EXPERIMENT_ENV = "GRAFTLINE_EXPERIMENT"
DEFAULT_EXPERIMENT = "graftline"

# dvc.lock outs whose hashes identify what a model came from.
LINEAGE_OUTS = {
    "graftline.dvc.task_data": ("preprocess", "data/processed/task"),
    "graftline.dvc.pretrain_data": ("preprocess", "data/processed/pretrain"),
    "graftline.dvc.pretrained_backbone": ("pretrain", "models/pretrained"),
    "graftline.dvc.finetuned_model": ("finetune", "models/finetuned"),
    "graftline.dvc.student_model": ("distill", "models/student"),
}


# Which process opened a run: host, pid and the process's start time (a pid alone is reused).
OWNER_TAG = "graftline.process"

log = logging.getLogger(__name__)


def owner() -> str:
    """This process, as the value of ``OWNER_TAG``."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.0f}"


def _owner_gone(value: str) -> bool:
    """Whether the process named by an ``OWNER_TAG`` value has certainly ended."""
    import psutil

    host, pid, started = value.rsplit(":", 2)
    if host != socket.gethostname():
        return False  # another machine's process: nothing can be known from here
    try:
        return f"{psutil.Process(int(pid)).create_time():.0f}" != started
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, ValueError):
        return False


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs that a killed process (``kill -9``, a crash, a power cut) left
    RUNNING: those whose owner process on this host has ended. Returns their ids."""
    from mlflow import MlflowClient

    client = MlflowClient()
    ended = []
    for run in client.search_runs(
        [experiment_id], "attributes.status = 'RUNNING'", max_results=1000
    ):
        tag = run.data.tags.get(OWNER_TAG)
        if tag and _owner_gone(tag):
            client.set_tag(run.info.run_id, "graftline.ended_by", "the next run: its process died")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    if ended:
        log.warning("marked %d run(s) left RUNNING by a dead process KILLED: %s", len(ended), ended)
    return ended


def tracking_uri(root: Path | str = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store at ``<root>/mlflow.db``."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    )


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail at once, naming the URI, when the tracking server does not answer: MLflow's own
    client would retry for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) and then fail in
    the middle of training. Stores that are files (``sqlite:``, paths) need no check."""
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered: reachable, whatever it thinks of /health
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise GraftlineError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or point "
            "MLFLOW_TRACKING_URI at a running one"
        ) from None


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)


def configure(root: Path | str = ".") -> str:
    """Point MLflow at the tracking store and the experiment; returns the experiment id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    own_store = not os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(root))  # which also sets MLFLOW_TRACKING_URI
    name = experiment_name()
    if own_store and mlflow.get_experiment_by_name(name) is None:
        # Artifacts beside the store, not in whatever the cwd is (MLflow's default `./mlruns`).
        with contextlib.suppress(MlflowException):  # created meanwhile by another process
            mlflow.create_experiment(name, (Path(root).resolve() / "mlruns").as_uri())
    return mlflow.set_experiment(name).experiment_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def git_commit(root: Path | str = ".") -> str:
    """The HEAD commit, with ``-dirty`` when tracked files differ from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def dvc_lock_hashes(root: Path | str = ".") -> dict[str, str]:
    """The md5 of the task data, pretraining data, backbone, fine-tuned model and student (a
    note when distillation is off) in dvc.lock."""
    lock_path = Path(root) / "dvc.lock"
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for tag, (stage, path) in LINEAGE_OUTS.items():
        for o in lock.get("stages", {}).get(stage, {}).get("outs", []):
            if o.get("path") == path and "md5" in o:
                out[tag] = o["md5"]
    return out


def lineage_tags(root: Path | str = ".", flow_run_id: str | None = None) -> dict[str, str]:
    """Git commit, dvc.lock hashes and the Prefect flow-run id (when run by the flow; from
    the argument in the flow's process, from ``GRAFTLINE_FLOW_RUN_ID`` in a stage process)."""
    tags = {"graftline.git_commit": git_commit(root), **dvc_lock_hashes(root)}
    flow_run_id = flow_run_id or os.environ.get(FLOW_RUN_ENV)
    if flow_run_id:
        tags["graftline.prefect_flow_run_id"] = flow_run_id
    return tags


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    root: Path | str = ".",
    parent_run_id: str | None = None,
    lineage: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the flow's run when there is one.

    The parent comes from ``parent_run_id`` or, in a stage process, ``GRAFTLINE_PARENT_RUN_ID``;
    the lineage tags are read from ``root`` unless given.
    """
    import mlflow

    end_orphaned_runs(configure(root))
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    tags = {
        "graftline.stage": stage,
        OWNER_TAG: owner(),
        **(lineage if lineage is not None else lineage_tags(root)),
    }
    with mlflow.start_run(
        run_name=stage, parent_run_id=parent, nested=parent is not None, tags=tags
    ) as run:
        mlflow.log_params(flatten(params, stage))
        try:
            yield run
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (tasks._stage): killed, not failed
            mlflow.end_run("KILLED")
            raise


def log_result(result: Mapping[str, Any]) -> float:
    """Log a stage's metrics, learning curves and artifacts to the active run.

    Per-epoch curves go in one batch call, not one call per epoch: against a SQLite store
    that is milliseconds instead of seconds. Returns the seconds spent logging.
    """
    import mlflow
    from mlflow.entities import Metric

    t0 = time.perf_counter()
    run = mlflow.active_run()
    assert run is not None, "log_result needs an active run"
    metrics = {
        k: float(v)
        for k, v in flatten(result.get("metrics", {})).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    if metrics:
        mlflow.log_metrics(metrics)
    now = int(time.time() * 1000)
    curve: list[Metric] = []
    for prefix, history in result.get("history", {}).items():
        for record in history:
            step = int(record["epoch"])
            for key, value in record.items():
                if key != "epoch":
                    name = f"{prefix}.{key}" if prefix else key
                    curve.append(Metric(name, float(value), now, step))
    client = mlflow.MlflowClient()
    for i in range(0, len(curve), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run.info.run_id, metrics=curve[i : i + 1000])
    for path in result.get("artifacts", []):
        if Path(path).exists():
            mlflow.log_artifact(str(path), artifact_path=Path(path).parent.name)
    return time.perf_counter() - t0
