"""Nothing lost under faults: each case makes the fault real and checks what is left behind.

Servers really absent or killed, files really bad, a loss that really diverges; no mocks.
After each fault: no process left, no MLflow run left RUNNING, no half-written output, the
champion unchanged. (Signals and kills mid-training: test_interrupts.py.)
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from graftline.errors import ArtifactError
from tests.conftest import (
    TINY_PARAMS,
    blob_digits,
    dvc,
    free_port,
    graftline,
    make_repo,
)
from tests.faults._pipeline import (
    EPOCHS,
    PARAMS,
    env_for,
    mlflow_statuses,
    sha256_of,
    stage_processes,
    start_graftline,
    wait_for_line,
)

pytestmark = pytest.mark.usefixtures("fault_prefect_api")


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path: Path) -> None:
    """Case 5: a tracking URI nobody answers on fails within seconds, naming the URI."""
    repo = make_repo(tmp_path / "repo", PARAMS)
    uri = f"http://127.0.0.1:{free_port()}"
    env = env_for(repo, tmp_path / "home", MLFLOW_TRACKING_URI=uri)
    started = time.monotonic()
    proc = graftline(repo, env, "run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - started < 30
    assert uri in proc.stderr and "unreachable" in proc.stderr
    assert not (repo / "data/processed").exists(), "work started before the check"


def test_non_finite_loss_fails_the_stage_and_registers_nothing(tmp_path: Path) -> None:
    """Case 10: a loss that turns NaN or infinite stops the stage, naming epoch and step."""
    from mlflow import MlflowClient

    params = copy.deepcopy(TINY_PARAMS)
    params["finetune"]["train"] |= {"lr": 1e30, "optimizer": "sgd"}
    repo = make_repo(tmp_path / "repo", params)
    proc = graftline(repo, env_for(repo, tmp_path / "home"), "run")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert re.search(r"non-finite loss .* at epoch \d+, step \d+", out), out[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert client.search_registered_models() == []
    assert not (repo / "models/finetuned/model.pt").exists()
    statuses = mlflow_statuses(repo)
    assert ("finetune", "FAILED") in statuses and ("pipeline", "FAILED") in statuses


class _Payload:
    """Unpickling this runs code: it creates the file named by ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_carrying_a_pickle_is_refused_by_every_loader(tmp_path: Path) -> None:
    """Case 12: a checkpoint that would run code when unpickled; no loader runs it."""
    from graftline.config import TrainConfig
    from graftline.data.dataset import Dataset
    from graftline.models import build_classifier
    from graftline.models.checkpoint import load_checkpoint, read_checkpoint
    from graftline.serve.mlflow_model import GraftlineClassifier
    from graftline.train import fit

    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"format": "graftline.checkpoint/1", "state_dict": _Payload(marker)}, evil)
    assert pickle.loads(pickle.dumps(_Payload(tmp_path / "probe"))) == 0  # the payload works
    assert (tmp_path / "probe").exists()

    for load in (read_checkpoint, load_checkpoint):
        with pytest.raises(ArtifactError, match="cannot load checkpoint safely"):
            load(evil)
    context = type("Context", (), {"artifacts": {"checkpoint": str(evil)}})()
    with pytest.raises(ArtifactError, match="cannot load checkpoint safely"):
        GraftlineClassifier().load_context(context)
    # As a resume checkpoint: ignored, and training starts afresh.
    x, y = blob_digits(10, classes=2)
    data = Dataset(x[:, None], y.astype("int64"), ["0", "1"], "blobs")
    model = build_classifier(
        {"arch": "cnn", "channels": [4], "hidden": 8, "dropout": 0.0}, 1, 28, 2
    )
    result = fit(
        model,
        data,
        None,
        TrainConfig(epochs=1, batch_size=8),
        seed=0,
        resume_path=evil,
        progress=False,
    )
    assert result.resumed_from is None
    assert not marker.exists(), "a loader ran the pickled payload"


def test_folder_source_with_a_link_outside_is_refused(tmp_path: Path) -> None:
    """Case 13: a link inside an image folder that points outside it stops preprocessing."""
    from PIL import Image

    images = tmp_path / "images"
    x, y = blob_digits(6, classes=2)
    for i, (img, k) in enumerate(zip(x, y, strict=True)):
        (images / str(k)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(images / str(k) / f"{i}.png")
    secret = tmp_path / "secret.png"
    Image.fromarray(x[0]).save(secret)
    (images / "1" / "innocent.png").symlink_to(secret)
    params = copy.deepcopy(TINY_PARAMS)
    params["preprocess"]["task"]["source"] = {"kind": "folder", "path": str(images)}
    params["preprocess"]["task"]["labels_per_class"] = "all"
    repo = make_repo(tmp_path / "repo", params)
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.preprocess"],
        cwd=repo,
        env=env_for(repo, tmp_path / "home"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert f"1/innocent.png: a link to {secret}, outside the folder" in proc.stderr
    assert not (repo / "data/processed/task").exists()


def _snapshot(repo: Path, remote: Path) -> dict[str, str]:
    skip = ("mlflow.db", "mlruns/", ".dvc/tmp/", ".graftline/", ".git/", "__pycache__")
    files = {}
    for root in (repo, remote):
        for p in sorted(root.rglob("*")):
            rel = f"{root.name}/{p.relative_to(root)}"
            if p.is_file() and not any(s in rel for s in skip):
                files[rel] = sha256_of(p)
    return files


def test_unreachable_remote_unchanged_rerun_corrupted_cache(tmp_path: Path) -> None:
    """One repo through three faults, in order (each needs a finished run before it):

    - case 7: the DVC remote does not answer during push: a clear error, the model stays
      registered, the data stays in the cache; once the remote is back the next run pushes;
    - case 17: a run with nothing changed changes nothing: files (outputs not even
      rewritten), registry, remote;
    - case 9: the cached copy of the fine-tuned model is corrupted (and checked out, as
      `dvc checkout` does without verifying): DVC reports it, the next run rebuilds the
      model instead of using it, repairs the cache, and the registry does not change.
    """
    from mlflow import MlflowClient

    url = f"http://127.0.0.1:{free_port()}/dvc"
    repo = make_repo(tmp_path / "repo", TINY_PARAMS)
    sh_env = env_for(repo, tmp_path / "home")
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", url],
        cwd=repo,
        env=sh_env,
        check=True,
        capture_output=True,
    )

    def run() -> subprocess.CompletedProcess:
        return graftline(repo, sh_env, "run", "--push")

    failed = run()
    assert failed.returncode != 0
    out = failed.stdout + failed.stderr
    assert f"dvc push to remote 'store' ({url}) failed" in out, out[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny-digits'")] == ["1"]
    cached = [p for p in (repo / ".dvc/cache").rglob("*") if p.is_file()]
    assert cached, "nothing in the local cache"

    remote = tmp_path / "remote"
    remote.mkdir()
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "modify", "store", "url", str(remote)],
        cwd=repo,
        env=sh_env,
        check=True,
        capture_output=True,
    )
    again = run()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(r"dvc push: [1-9]\d* file\(s\) sent", again.stdout + again.stderr)
    status = dvc(repo, sh_env, "status", "--cloud")
    assert "in sync" in status.stdout, status.stdout + status.stderr
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny-digits'")] == ["1"]

    def registry() -> list[Any]:
        versions = client.search_model_versions("name = 'tiny-digits'")
        models = client.search_registered_models()
        return sorted((v.version, sorted(v.tags.items())) for v in versions) + [
            (m.name, sorted(m.aliases.items())) for m in models
        ]

    files, models = _snapshot(repo, remote), registry()
    mtimes = {p: p.stat().st_mtime_ns for p in (repo / "models").rglob("*") if p.is_file()}
    unchanged = run()
    assert unchanged.returncode == 0, unchanged.stdout[-3000:] + unchanged.stderr[-3000:]
    assert _snapshot(repo, remote) == files
    assert registry() == models
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes, "outputs were rewritten"

    model = repo / "models/finetuned/model.pt"
    good = hashlib.md5(model.read_bytes()).hexdigest()
    cached = repo / ".dvc/cache/files/md5" / good[:2] / good[2:]
    cached.chmod(0o644)
    damaged = bytearray(cached.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte inside the weights
    cached.write_bytes(bytes(damaged))
    model.unlink()
    assert dvc(repo, sh_env, "checkout", "models/finetuned").returncode == 0
    assert hashlib.md5(model.read_bytes()).hexdigest() != good  # the damage is in place
    status = dvc(repo, sh_env, "status", "finetune")
    assert "not in cache" in status.stdout, status.stdout
    rebuilt = run()
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    assert "Running stage 'finetune'" in rebuilt.stdout + rebuilt.stderr
    assert hashlib.md5(model.read_bytes()).hexdigest() == good
    assert hashlib.md5(cached.read_bytes()).hexdigest() == good, "the cache was not repaired"
    assert registry() == models


def test_tracking_server_killed_mid_run_then_restarted(tmp_path: Path) -> None:
    """Case 6: the MLflow server dies (its whole process group, SIGKILL) while pretraining
    trains: the run fails with a clear error; once the server is back, the rerun completes,
    closes what the dead attempt left RUNNING, and the registry holds one version."""
    from mlflow import MlflowClient

    from tests.conftest import mlflow_server

    store = tmp_path / "store"
    store.mkdir()
    repo = make_repo(tmp_path / "repo", PARAMS)
    port = free_port()
    retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    with mlflow_server(store, port) as (url, server):
        env = env_for(repo, tmp_path / "home", MLFLOW_TRACKING_URI=url, **retries)
        log = tmp_path / "first.log"
        first = start_graftline(repo, env, "run", log=log)
        wait_for_line(log, rf"pretrain epoch {EPOCHS // 10 * 2}/{EPOCHS}", first)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        assert first.wait(timeout=180) != 0
        assert url in log.read_text() or "Connection refused" in log.read_text()
    assert not stage_processes(repo)
    with mlflow_server(store, port) as (url, _):
        again = graftline(repo, env, "run")
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        client = MlflowClient(tracking_uri=url)
        versions = client.search_model_versions("name = 'tiny-digits'")
        assert [str(v.version) for v in versions] == ["1"]
        experiments = [e.experiment_id for e in client.search_experiments()]
        statuses = [r.info.status for r in client.search_runs(experiments, max_results=1000)]
        assert "RUNNING" not in statuses, statuses
        assert "KILLED" in statuses  # the dead attempt's runs, closed by the rerun
