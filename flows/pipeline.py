"""The graftline pipeline as a Prefect flow.

Each of ``preprocess``, ``pretrain``, ``finetune`` and ``evaluate`` runs the DVC stage of the
same name (``dvc repro --single-item``), so DVC decides what is stale and ``dvc.lock`` stays
true; the stage's output goes to the Prefect logs. ``package`` logs the fine-tuned model to
MLflow and scores it (and the champion) while ``evaluate`` runs; ``deploy`` then registers,
gates and promotes it. The flow opens one MLflow parent run and passes its id to every
stage process (MLflow's active run does not cross processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from graftline import tracking
from graftline.config import load_params
from graftline.errors import GraftlineError

if TYPE_CHECKING:
    from tasks.deploy import Packaged

STAGES = ("preprocess", "pretrain", "finetune", "evaluate")


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


def stage_is_current(stage: str, root: Path) -> bool:
    """True when ``dvc status`` finds nothing changed for the stage: its deps, params and outs
    match ``dvc.lock``. Asked in-process (~0.1 s), not by starting ``dvc`` (~0.6 s)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        # an absolute target: DVC resolves relative ones against the process's cwd
        return not repo.status(targets=[f"{root.resolve() / 'dvc.yaml'}:{stage}"])


def run_dvc_stage(stage: str, root: Path, env: dict[str, str]) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``, streaming its output to the Prefect log; a stage
    that DVC reports unchanged is not started at all."""
    logger = get_run_logger()
    if stage_is_current(stage, root):
        logger.info("Stage '%s' didn't change, skipping (dvc status)", stage)
        return {"stage": stage, "ran": False}
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            logger.info(line)
    if proc.wait() != 0:
        own = [x for x in lines if f"graftline {stage}: error:" in x or x.startswith("ERROR")]
        raise StageFailed("\n".join(own or lines[-10:]) or f"stage {stage} failed")
    ran = any(f"Running stage '{stage}'" in x for x in lines)
    return {"stage": stage, "ran": ran}


@task(name="preprocess", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_transient)
def preprocess(root: Path, env: dict[str, str]) -> dict[str, Any]:
    return run_dvc_stage("preprocess", root, env)


@task(name="pretrain", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_transient)
def pretrain(root: Path, env: dict[str, str]) -> dict[str, Any]:
    return run_dvc_stage("pretrain", root, env)


@task(name="finetune", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_transient)
def finetune(root: Path, env: dict[str, str]) -> dict[str, Any]:
    return run_dvc_stage("finetune", root, env)


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
    md5 = lineage.get("graftline.dvc.finetuned_model")
    unchanged = deploy_task.already_registered(params, root, finetuned_md5=md5)
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
        tracking.log_result(result)
    logger.info(
        "deploy: v%s %s: %s",
        result["version"],
        "promoted" if result["promoted"] else "not promoted",
        result["decision"].reason,
    )
    return {k: v for k, v in result.items() if k != "decision"} | {
        "reason": result["decision"].reason
    }


@task(name="push", retries=2, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_transient)
def push(root: Path, env: dict[str, str]) -> str:
    """Send data and model artifacts to the DVC remote."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "push"], cwd=root, env=env, capture_output=True, text=True
    )
    get_run_logger().info(proc.stdout.strip())
    if proc.returncode:
        raise StageFailed(f"dvc push failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


@flow(name="graftline-pipeline")
def pipeline(
    root: str = ".",
    params: str = "params.yaml",
    deploy_model: bool = True,
    push_artifacts: bool = False,
) -> dict[str, Any]:
    """preprocess -> pretrain -> finetune -> evaluate -> deploy, under one MLflow parent run."""
    from mlflow import MlflowClient

    root_path = Path(root).resolve()
    params_path = (root_path / params).resolve()
    load_params(params_path)  # fail before any work, naming the bad key
    exp_id = tracking.configure(root_path)
    client = MlflowClient()
    flow_run_id = str(flow_run.id or "")
    parent = client.create_run(
        exp_id,
        run_name="pipeline",
        tags={
            "graftline.stage": "pipeline",
            "graftline.prefect_flow_run_id": flow_run_id,
            "graftline.git_commit": tracking.git_commit(root_path),
        },
    )
    parent_id = parent.info.run_id
    env = {
        **os.environ,
        tracking.PARENT_RUN_ENV: parent_id,
        tracking.FLOW_RUN_ENV: flow_run_id,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLFLOW_RUN_ID", None)  # it would override the explicit parent (mlflow#15713)
    packaging: PrefectFuture[Packaged | str] | None = None
    try:
        stages = [t(root_path, env) for t in (preprocess, pretrain, finetune)]
        if deploy_model:
            # Packaging needs only finetune's outputs: it runs while evaluate does, and the
            # registry changes only after evaluate has succeeded.
            lineage = tracking.lineage_tags(root_path, flow_run_id)
            packaging = package.submit(root_path, parent_id, params_path, lineage)
        evaluated = evaluate(root_path, env)
        stages.append(evaluated)
        for key, value in tracking.dvc_lock_hashes(root_path).items():
            client.set_tag(parent_id, key, value)
        result: dict[str, Any] = {
            "stages": stages,
            "metrics": evaluated["metrics"],
            "mlflow_run_id": parent_id,
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
            result["pushed"] = push(root_path, env)
    except BaseException:
        if packaging is not None:
            packaging.wait()  # let it finish its MLflow writes before the process ends
        client.set_terminated(parent_id, "FAILED")
        raise
    client.set_terminated(parent_id, "FINISHED")
    return result


if __name__ == "__main__":
    pipeline()
