"""Training past one process: a stage under torchrun (gloo on CPU), from `dvc repro`.

`-k ddp` selects these.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import psutil

from tests.conftest import TINY_PARAMS, dvc, make_repo, tool_env

PARAMS = copy.deepcopy(TINY_PARAMS)
PARAMS["pretrain"]["train"]["epochs"] = 6


def _with_ranks(ranks: int) -> dict:
    params = copy.deepcopy(PARAMS)
    params["pretrain"]["train"]["distributed"] = {"nproc_per_node": ranks}
    return params


def _left_behind(repo: Path) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["cwd"] == str(repo) and ("tasks." in cmd or "torch.distributed" in cmd):
            found.append(cmd)
    return found


def test_ddp_two_ranks_pretrain_like_one_rank_with_the_same_outputs(tmp_path: Path) -> None:
    results = {}
    for ranks in (1, 2):
        repo = make_repo(tmp_path / f"r{ranks}", _with_ranks(ranks))
        env = tool_env(repo)
        env.pop("MLFLOW_TRACKING_URI", None)
        started = time.monotonic()
        proc = dvc(repo, env, "repro", "pretrain")
        seconds = time.monotonic() - started
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        metrics = json.loads((repo / "reports/pretrain/metrics.json").read_text())
        files = sorted(
            str(p.relative_to(repo))
            for folder in ("models/pretrained", "reports/pretrain")
            for p in (repo / folder).rglob("*")
        )
        results[ranks] = (metrics, files, proc.stdout + proc.stderr, seconds)
        assert not _left_behind(repo)
    (one, files1, _, s1), (two, files2, log2, s2) = results[1], results[2]
    print(
        f"pretrain: 1 rank {s1:.1f} s val_acc {one['val_acc']:.3f}; 2 ranks {s2:.1f} s val_acc {two['val_acc']:.3f}"
    )
    assert "world_size=2" in log2 and log2.count("pretrain epoch 6/6") == 1  # rank 0 logs
    assert files2 == files1
    assert abs(two["val_acc"] - one["val_acc"]) < 0.1, (one, two)
    assert two["val_acc"] > 0.5


def test_ddp_a_rank_that_raises_fails_the_stage_cleanly(tmp_path: Path) -> None:
    """A fault on rank 1 only: the stage fails with that rank's message, rank 0 stops too,
    nothing is written and no process stays behind."""
    from mlflow import MlflowClient

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import graftline.train\n"
        "    from graftline.errors import TrainingError\n"
        "    def fit(*args, **kwargs):\n"
        "        raise TrainingError('injected fault on rank 1')\n"
        "    graftline.train.fit = fit\n"
    )
    repo = make_repo(tmp_path / "repo", _with_ranks(2))
    env = tool_env(repo, PYTHONPATH=f"{repo}:{inject}")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = dvc(repo, env, "repro", "pretrain")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "graftline pretrain: error (rank 1): injected fault on rank 1" in out, out[-3000:]
    assert not (repo / "models/pretrained/model.pt").exists()
    time.sleep(1)
    assert not _left_behind(repo)
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    # rank 0 may be stopped before or after it opened its run: never left RUNNING
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]


def test_ddp_resumes_from_the_checkpoint_of_an_interrupted_run(tmp_path: Path) -> None:
    """SIGTERM to a 2-rank `dvc repro` mid-training: no rank stays behind, and the rerun
    resumes from rank 0's last epoch checkpoint, under 2 ranks again, to the same weights
    as a 2-rank run that was never interrupted."""
    import signal
    import subprocess
    import sys

    import torch

    params = _with_ranks(2)
    params["pretrain"]["train"]["epochs"] = 40
    reference = make_repo(tmp_path / "reference", params)
    env = tool_env(reference)
    env.pop("MLFLOW_TRACKING_URI", None)
    assert dvc(reference, env, "repro", "pretrain").returncode == 0
    expected = torch.load(reference / "models/pretrained/model.pt", weights_only=True)

    repo = make_repo(tmp_path / "repo", params)
    env = tool_env(repo)
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "pretrain"],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    checkpoint = repo / ".graftline/checkpoints/pretrain/last.pt"
    deadline = time.time() + 180
    while time.time() < deadline:
        if checkpoint.exists():
            try:
                if torch.load(checkpoint, weights_only=True)["state"]["epoch"] >= 3:
                    break
            except Exception:  # being replaced right now
                pass
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    epoch = torch.load(checkpoint, weights_only=True)["state"]["epoch"]
    assert epoch + 1 < 40, "pretraining ended before it could be interrupted"
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(timeout=60) != 0
    deadline = time.time() + 30  # rank 0 closes its MLflow run on the way out
    while _left_behind(repo) and time.time() < deadline:
        time.sleep(0.5)
    assert not _left_behind(repo)
    assert "Traceback" not in (tmp_path / "first.log").read_text().split("[rank")[0]

    rerun = dvc(repo, env, "repro", "pretrain")
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert "resuming after epoch" in out and "world_size=2" in out
    got = torch.load(repo / "models/pretrained/model.pt", weights_only=True)
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


def test_ddp_runs_masked_autoencoding_of_a_vit_on_an_unlabelled_corpus(tmp_path: Path) -> None:
    """The large-model path under torchrun: a ViT pretrained by MAE (its decoder's gradients
    averaged beside the backbone's) on a corpus whose labels are ignored."""
    from tests.integration.test_flow import TINY_VIT_PRESET

    params = copy.deepcopy(TINY_VIT_PRESET)
    params["pretrain"]["train"]["distributed"] = {"nproc_per_node": 2}
    repo = make_repo(tmp_path / "repo", params)
    env = tool_env(repo)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = dvc(repo, env, "repro", "pretrain")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "world_size=2" in out
    history = (repo / "reports/pretrain/history.csv").read_text().splitlines()
    assert "val_knn_acc" in history[0] and len(history) == 1 + 2
    assert (repo / "models/pretrained/model.pt").exists()
