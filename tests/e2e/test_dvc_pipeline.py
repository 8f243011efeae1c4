"""`dvc repro` on a temporary copy of the repo with tiny params: outputs, no-op re-run,
a selective re-run by `dvc exp run -S`, and a push to a local remote."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY_PARAMS, make_repo, sh

pytestmark = pytest.mark.e2e


def ran(proc: subprocess.CompletedProcess) -> list[str]:
    out = proc.stdout + proc.stderr
    return [
        s
        for s in ("preprocess", "pretrain", "finetune", "distill", "evaluate")
        if f"Running stage '{s}'" in out
    ]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(
        tmp_path_factory.mktemp("repo"), TINY_PARAMS, tmp_path_factory.mktemp("remote")
    )


def test_repro_from_nothing_then_noop(repo: Path) -> None:
    first = sh(["dvc", "repro"], repo)
    assert ran(first) == ["preprocess", "pretrain", "finetune", "distill", "evaluate"]
    for out in (
        "models/pretrained/model.pt",
        "models/finetuned/model.pt",
        "models/scratch/model.pt",
        "reports/evaluate/confusion.png",
        "reports/evaluate/learning_curves.png",
        "reports/evaluate/calibration.png",
    ):
        assert (repo / out).stat().st_size > 0, out
    manifest = json.loads((repo / "data/processed/task/manifest.json").read_text())
    assert manifest["splits"]["train"]["per_class"] == {str(k): 5 for k in range(10)}
    assert manifest["splits"]["test"]["count"] == 360  # the budget never shrinks the test split
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics) >= {"finetuned", "scratch", "svc"}
    for m in ("finetuned", "scratch", "svc"):
        assert 0.0 <= metrics[m]["accuracy"] <= 1.0 and "ece" in metrics[m]
    assert metrics["svc"]["accuracy"] > 0.5  # a real baseline on real data, not noise

    # Under plain `dvc repro` every stage still logs its MLflow run (no parent).
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("graftline")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["graftline.stage"] for r in runs) == [
        "distill",
        "evaluate",
        "finetune",
        "preprocess",
        "pretrain",
    ]
    assert all("mlflow.parentRunId" not in r.data.tags for r in runs)
    evaluate_run = next(r for r in runs if r.data.tags["graftline.stage"] == "evaluate")
    artifacts = {a.path for a in client.list_artifacts(evaluate_run.info.run_id, "evaluate")}
    assert "evaluate/confusion.png" in artifacts

    again = sh(["dvc", "repro"], repo)
    assert ran(again) == []
    status = sh(["dvc", "status"], repo)
    assert "up to date" in status.stdout

    shown = sh(["dvc", "metrics", "show", "--json"], repo)
    assert "finetuned" in shown.stdout
    plots = sh(["dvc", "plots", "show", "-o", str(repo / ".plots")], repo)
    assert (repo / ".plots" / "index.html").exists(), plots.stdout


def test_label_efficiency_benchmark_draws_its_curve(repo: Path) -> None:
    """The benchmark behind the report's label-efficiency figure, on this checkout's tiny
    params and backbone: one row per budget, the test split the same for every row."""
    out = repo / "reports" / "label_efficiency.csv"
    bench = ROOT / "benchmarks" / "bench_label_efficiency.py"
    args = ["--root", str(repo), "--budgets", "1", "all", "--epochs", "2"]
    proc = subprocess.run(
        [sys.executable, str(bench), *args], capture_output=True, text=True, cwd=repo
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    try:
        rows = list(csv.DictReader(out.open()))
        assert [r["labels_per_class"] for r in rows] == ["1", "all"]
        assert int(rows[0]["train_labels"]) == 10 < int(rows[1]["train_labels"])
        for r in rows:
            for m in ("finetuned", "scratch", "svc"):
                assert 0.0 <= float(r[f"{m}_accuracy"]) <= 1.0
        assert out.with_suffix(".png").stat().st_size > 10_000
        assert "finetuned/scratch" in proc.stdout
    finally:
        out.unlink(missing_ok=True)
        out.with_suffix(".png").unlink(missing_ok=True)


def test_exp_run_with_a_finetune_param_reruns_only_finetune_and_evaluate(repo: Path) -> None:
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "the first run's lock"], repo)
    proc = sh(["dvc", "exp", "run", "-S", "finetune.strategy=linear_probe"], repo)
    assert ran(proc) == ["finetune", "distill", "evaluate"]
    shown = sh(["dvc", "exp", "show", "--json"], repo)
    assert "linear_probe" in shown.stdout
    diff = json.loads(sh(["dvc", "params", "diff", "--json"], repo).stdout)
    assert diff["params.yaml"]["finetune.strategy"] == {"old": "gradual", "new": "linear_probe"}


def test_bad_params_fail_the_stage_and_change_nothing(repo: Path) -> None:
    lock_before = (repo / "dvc.lock").read_text()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["preprocess"]["task"]["source"] = {"kind": "csv", "path": "data/raw/missing.csv"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = sh(["dvc", "repro"], repo, check=False)
    assert proc.returncode != 0
    assert "data/raw/missing.csv: CSV file not found" in proc.stderr + proc.stdout
    assert ran(proc) == ["preprocess"]
    assert (repo / "dvc.lock").read_text() == lock_before


def test_push_to_the_local_remote(repo: Path) -> None:
    sh(["git", "checkout", "--", "params.yaml"], repo)
    sh(["dvc", "checkout"], repo, check=False)
    sh(["dvc", "repro"], repo)
    push = sh(["dvc", "push"], repo)
    assert "pushed" in push.stdout or "Everything is up to date" in push.stdout
    assert (
        sh(["dvc", "status", "--cloud"], repo).stdout.strip().endswith("up to date.")
        or "Cache and remote 'local' are in sync" in sh(["dvc", "status", "--cloud"], repo).stdout
    )
