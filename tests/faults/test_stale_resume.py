"""A resume never continues on changed inputs: finetune killed mid-run, then the backbone
retrained with other params, starts afresh, says why, and ends with a clean run's weights."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from tests.conftest import TINY_PARAMS, dvc, make_repo, tool_env

PARAMS = copy.deepcopy(TINY_PARAMS)
PARAMS["finetune"]["train"]["epochs"] = 150  # long enough to be killed mid-way


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _set_pretrain_epochs(repo: Path, epochs: int) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["train"]["epochs"] = epochs
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_resume_after_the_backbone_changed_starts_afresh(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", PARAMS)
    env = tool_env(repo, SHELL="/bin/sh")
    done = dvc(repo, env, "repro", "pretrain")
    assert done.returncode == 0, done.stderr
    # finetune killed (SIGKILL, its whole process group) once it has written a resume point
    checkpoint = repo / ".graftline/checkpoints/finetune/finetuned/last.pt"
    run = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "finetune"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["state"]["epoch"] + 1 < PARAMS["finetune"]["train"]["epochs"]

    # the backbone changes: other pretraining params, so other weights
    _set_pretrain_epochs(repo, 3)
    again = dvc(repo, env, "repro", "finetune")
    assert again.returncode == 0, again.stderr
    said = again.stdout + again.stderr
    assert "resuming after epoch" not in said
    lines = [line for line in said.splitlines() if "starting afresh" in line]
    assert len(lines) == 1 and "starting weights changed" in lines[0], lines

    # the same weights as a clean run on the new backbone, in the same checkout: each stage
    # again from scratch, with no resume point left to find
    resumed = {m: _sha(repo / f"models/{m}/model.pt") for m in ("pretrained", "finetuned")}
    shutil.rmtree(repo / ".graftline/checkpoints")
    for stage in ("pretrain", "finetune"):
        clean = dvc(repo, env, "repro", "--force", "--single-item", "--no-run-cache", stage)
        assert clean.returncode == 0, clean.stderr
        assert f"Running stage '{stage}'" in clean.stdout + clean.stderr
        assert "resuming after epoch" not in clean.stdout + clean.stderr
    assert {m: _sha(repo / f"models/{m}/model.pt") for m in resumed} == resumed
