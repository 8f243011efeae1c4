"""The graftline pipeline as a Prefect flow.

Each of ``preprocess``, ``pretrain``, ``finetune`` and ``evaluate`` reproduces the DVC stage of
the same name in this process (``Repo.reproduce``, single item), so DVC decides what is stale
and ``dvc.lock`` stays true; DVC's messages and the stage process's output go to the Prefect
log. ``package`` logs the fine-tuned model to MLflow and scores it (and the champion) while
``evaluate`` runs; ``deploy`` then registers, gates and promotes it. The flow opens one MLflow
parent run and passes its id to every stage process (MLflow's active run does not cross
processes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for

from graftline import processes, tracking
from graftline.config import apply_preset, load_params, require_tracked_sections
from graftline.errors import GraftlineError
from graftline.layout import STAGES
from tasks._stage import STAGE_LOG_ENV

if TYPE_CHECKING:
    from tasks.deploy import Packaged

PIPELINE_LOCK = processes.PIPELINE_LOCK


class StageFailed(GraftlineError):
    """A pipeline stage exited non-zero; the message is the stage's own error."""


def _transient(_task: Any, _run: Any, state: Any) -> bool:
    """Retry only what can pass on a second try: locks, connections, timeouts."""
    try:
        state.result()
    except Exception as err:  # the state's exception, re-raised
        text = f"{type(err).__name__}: {err}".lower()
        return any(
            s in text
            for s in (
                "unable to acquire lock",
                "connection",
                "timed out",
                "temporarily unavailable",
                "database is locked",
                "503",
            )
        )
    return False


def _stage_target(stage: str, root: Path) -> str:
    # absolute: DVC resolves a relative target against the process's cwd, not the repo
    return f"{root.resolve() / 'dvc.yaml'}:{stage}"


class _Forward(logging.Handler):
    """Hands DVC's own messages ("Running stage", "Updating lock file") to the task's log."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().rstrip()
        if text:
            self._emit(text)


@contextlib.contextmanager
def _dvc_messages(emit: Callable[[str], None]) -> Iterator[None]:
    """DVC's messages go to ``emit`` only, in place of the console handlers DVC installs."""
    dvc_log = logging.getLogger("dvc")
    saved = dvc_log.handlers[:], dvc_log.level, dvc_log.propagate
    dvc_log.handlers = [_Forward(emit)]
    dvc_log.setLevel(logging.INFO)
    dvc_log.propagate = False
    try:
        yield
    finally:
        dvc_log.handlers, dvc_log.level, dvc_log.propagate = saved


@contextlib.contextmanager
def _stage_output(emit: Callable[[str], None]) -> Iterator[Path]:
    """A file for the stage process's stdout and stderr (``tasks._stage.STAGE_LOG_ENV``),
    followed line by line into ``emit`` while the stage runs."""
    done = threading.Event()
    with tempfile.TemporaryDirectory(prefix="graftline-stage-") as tmp:
        path = Path(tmp) / "output.log"
        path.touch()

        def follow() -> None:
            pending = ""
            with path.open(encoding="utf-8", errors="replace") as f:
                while True:
                    finished = done.is_set()  # before the read: nothing written after it
                    chunk = f.read()
                    if chunk:
                        *lines, pending = (pending + chunk).split("\n")
                        for line in lines:
                            if line.strip():
                                emit(line.rstrip())
                    elif finished:
                        break
                    else:
                        time.sleep(0.1)
            if pending.strip():
                emit(pending.rstrip())

        follower = threading.Thread(target=follow, name="stage-output", daemon=True)
        follower.start()
        try:
            yield path
        finally:
            done.set()
            follower.join()


def run_dvc_stage(stage: str, root: Path, run_env: dict[str, str]) -> dict[str, Any]:
    """Reproduce one DVC stage in this process (``Repo.reproduce``, single item), with the
    stage's output and DVC's messages in the Prefect log; a stage that ``dvc status`` finds
    unchanged is not started at all."""
    from dvc.repo import Repo

    logger = get_run_logger()
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        logger.info(line)

    target = _stage_target(stage, root)
    with Repo(str(root)) as repo:
        if not repo.status(targets=[target]):
            logger.info("Stage '%s' didn't change, skipping (dvc status)", stage)
            return {"stage": stage, "ran": False}
        # DVC leaves the stage process running when this one is interrupted (SIGTERM from a
        # cancellation, Ctrl-C): stop what the stage started, but not what was here before
        # (the temporary Prefect server of `graftline run`).
        others = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            # DVC resolves some paths against the process's cwd (stage/cache.py, dvc 3.67):
            # the stage runs from the repo root, as under `dvc repro`.
            # DVC's "To track the changes with git, run: git add dvc.lock" after every stage:
            # `graftline run` says it once, at the end (as `dvc repro --quiet` would not).
            repo.scm_context.quiet = True
            with contextlib.chdir(root), _dvc_messages(emit), _stage_output(emit) as output:
                ran = repo.reproduce(
                    targets=[target],
                    single_item=True,
                    run_env={**run_env, STAGE_LOG_ENV: str(output)},
                )
        except Exception as err:
            own = [x for x in lines if f"graftline {stage}: error:" in x]
            cause = f"{err}: {err.__cause__}" if err.__cause__ else str(err)
            raise StageFailed("\n".join(own) or "\n".join([*lines[-10:], cause])) from err
        except BaseException:
            stopped = processes.stop_descendants(exclude=others)
            logger.warning("Stage '%s' interrupted; stopped its processes %s", stage, stopped)
            raise
    cached = any("is cached - skipping run" in x for x in lines)  # DVC's run cache
    return {"stage": stage, "ran": bool(ran) and not cached, "cached": cached}


@task(name="preprocess", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_transient)
def preprocess(root: Path, env: dict[str, str]) -> dict[str, Any]:
    return run_dvc_stage("preprocess", root, env)


@task(name="pretrain", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_transient)
def pretrain(root: Path, env: dict[str, str]) -> dict[str, Any]:
    return run_dvc_stage("pretrain", root, env)


@task(name="finetune", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_transient)
def finetune(root: Path, env: dict[str, str]) -> dict[str, Any]:
    return run_dvc_stage("finetune", root, env)


@task(name="distill", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_transient)
def distill(root: Path, env: dict[str, str]) -> dict[str, Any]:
    return run_dvc_stage("distill", root, env)


@task(name="evaluate", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_transient)
def evaluate(root: Path, env: dict[str, str]) -> dict[str, Any]:
    out = run_dvc_stage("evaluate", root, env)
    out["metrics"] = json.loads((root / "reports" / "metrics.json").read_text())
    return out


@task(name="package", retries=2, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_transient)
def package(
    root: Path, parent_run_id: str, params_path: Path, lineage: dict[str, str]
) -> Packaged | str:
    """Log the fine-tuned model to MLflow and score it and the champion; runs beside
    ``evaluate``. Returns the registered version instead when the model is unchanged."""
    from tasks import deploy as deploy_task

    params = load_params(params_path)
    md5 = lineage.get(deploy_task.model_tag(params))
    unchanged = deploy_task.already_registered(params, root, model_md5=md5)
    if unchanged is not None:
        return unchanged
    with tracking.stage_run(
        "deploy", params.deploy.model_dump(), root, parent_run_id, lineage=lineage
    ):
        return deploy_task.package(params, root)


@task(name="deploy", retries=2, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_transient)
def deploy(root: Path, params_path: Path, packaged: Packaged | str) -> dict[str, Any]:
    """Register, gate, promote; skipped when the fine-tuned model is already registered."""
    import mlflow

    from tasks import deploy as deploy_task

    logger = get_run_logger()
    if isinstance(packaged, str):
        logger.info("deploy: the fine-tuned model is already v%s; nothing to register", packaged)
        return {
            "skipped": True,
            "version": packaged,
            "promoted": False,
            "markdown": f"Model unchanged since v{packaged}; nothing registered.\n",
        }
    params = load_params(params_path)
    tracking.configure(root)
    with mlflow.start_run(run_id=packaged.run_id):  # the run `package` opened and logged to
        result = deploy_task.run(
            params, root, flow_run_id=str(flow_run.id or "") or None, packaged=packaged
        )
        tracking.log_result(result)  # tasks.deploy has logged the decision
    return {k: v for k, v in result.items() if k != "decision"} | {
        "reason": result["decision"].reason
    }


@task(name="push", retries=2, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_transient)
def push(root: Path) -> str:
    """Send data and model artifacts to the DVC remote."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, contextlib.chdir(root):
        try:
            count = repo.push()
        except Exception as err:
            name = repo.config["core"].get("remote", "")
            url = repo.config["remote"].get(name, {}).get("url", "?")
            raise StageFailed(
                f"dvc push to remote {name!r} ({url}) failed: {err}. The data and models stay "
                "in the local DVC cache, and the registry keeps the model; the next run with "
                "push pushes them"
            ) from err
    message = f"dvc push: {count} file(s) sent to the remote"
    get_run_logger().info(message)
    return message


@flow(name="graftline-pipeline")
def pipeline(
    root: str = ".",
    params: str = "params.yaml",
    deploy_model: bool = True,
    push_artifacts: bool = False,
    until: str | None = None,
) -> dict[str, Any]:
    """preprocess -> pretrain -> finetune -> distill -> evaluate -> deploy, under one MLflow
    parent run; ``until`` names the last stage to run (no gate or deploy unless it is all)."""
    if until is not None and until not in STAGES:
        raise ValueError(f"until: {until!r} is not a stage ({', '.join(STAGES)})")
    root_path = Path(root).resolve()
    params_path = (root_path / params).resolve()
    load_params(params_path)  # fail before any work, naming the bad key
    # One pipeline per checkout: a second would collide on DVC's locks and race the registry.
    with processes.exclusive(
        root_path / PIPELINE_LOCK, "another pipeline is running in this checkout"
    ):
        kept = apply_preset(params_path, root_path)
        if kept is not None:
            get_run_logger().info(
                "params.yaml now holds %s (the previous one is in %s; `git checkout "
                "params.yaml` goes back)",
                params,
                kept.relative_to(root_path),
            )
            params_path = root_path / "params.yaml"
        require_tracked_sections(params_path, root_path / "dvc.yaml")
        last = STAGES.index(until) if until is not None else len(STAGES) - 1
        deploy_model = deploy_model and until is None
        return _pipeline(root_path, params_path, deploy_model, push_artifacts, last)


def _pipeline(
    root_path: Path, params_path: Path, deploy_model: bool, push_artifacts: bool, last: int
) -> dict[str, Any]:
    from mlflow import MlflowClient

    tracking.check_reachable()
    exp_id = tracking.configure(root_path)
    tracking.end_orphaned_runs(exp_id)  # what a killed earlier run left RUNNING
    client = MlflowClient()
    flow_run_id = str(flow_run.id or "")
    parent = client.create_run(
        exp_id,
        run_name="pipeline",
        tags={
            "graftline.stage": "pipeline",
            tracking.OWNER_TAG: tracking.owner(),
            "graftline.prefect_flow_run_id": flow_run_id,
            "graftline.git_commit": tracking.git_commit(root_path),
        },
    )
    parent_id = parent.info.run_id
    # What the stage processes get on top of this process's environment.
    env = {
        tracking.PARENT_RUN_ENV: parent_id,
        tracking.FLOW_RUN_ENV: flow_run_id,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # a set MLFLOW_RUN_ID would override the explicit parent (mlflow#15713); empty is unset
        "MLFLOW_RUN_ID": "",
    }
    packaging: PrefectFuture[Packaged | str] | None = None
    try:
        stages = [t(root_path, env) for t in (preprocess, pretrain, finetune, distill)[: last + 1]]
        if deploy_model:
            # Packaging needs only the deployed model: it runs while evaluate does, and the
            # registry changes only after evaluate has succeeded.
            lineage = tracking.lineage_tags(root_path, flow_run_id)
            packaging = package.submit(root_path, parent_id, params_path, lineage)
        evaluated = evaluate(root_path, env) if last == len(STAGES) - 1 else None
        if evaluated is not None:
            stages.append(evaluated)
        for key, value in tracking.dvc_lock_hashes(root_path).items():
            client.set_tag(parent_id, key, value)
        result: dict[str, Any] = {
            "stages": stages,
            "metrics": evaluated["metrics"] if evaluated is not None else {},
            "until": STAGES[last],
            "mlflow_run_id": parent_id,
            "mlflow_experiment_id": exp_id,
            "flow_run": {
                "id": flow_run_id,
                "name": flow_run.name,
                "url": url_for("flow-run", obj_id=flow_run_id) if flow_run_id else None,
            },
        }
        if packaging is not None:
            deployed = deploy(root_path, params_path, packaging.result())
            result["deploy"] = deployed
            create_markdown_artifact(
                key="evaluation-report",
                markdown=deployed["markdown"],
                description="graftline evaluation and gate decision",
            )
        if push_artifacts:
            result["pushed"] = push(root_path)
    except BaseException as err:
        if packaging is not None:
            packaging.wait()  # let it finish its MLflow writes before the process ends
        # Exceptions fail the run; a signal (cancellation, Ctrl-C) kills it.
        status = "FAILED" if isinstance(err, Exception) else "KILLED"
        try:
            client.set_terminated(parent_id, status)
        except Exception as closing:  # the tracking server may be what failed
            get_run_logger().warning(
                "could not mark MLflow run %s %s (%s); the next run will",
                parent_id,
                status,
                str(closing)[:300],
            )
        raise
    client.set_terminated(parent_id, "FINISHED")
    return result


if __name__ == "__main__":
    pipeline()
