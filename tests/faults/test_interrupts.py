"""Interrupted work loses nothing: `graftline run` and its stage really signalled (SIGTERM,
SIGKILL, a burst of both) mid-training, and a trainer killed while it writes its checkpoint.
After each: no process left, no MLflow run left RUNNING, no half-written output, DVC's lock
released, and a rerun that lands on the same weights as a run never interrupted.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import dvc, graftline, make_repo, tool_env
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The pretrained weights of a run that nobody interrupted (plain `dvc repro`)."""
    repo = make_repo(tmp_path_factory.mktemp("reference"), PARAMS)
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "pretrain"],
        cwd=repo,
        env=env_for(repo, tmp_path_factory.mktemp("home")),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sha256_of(repo / "models/pretrained/model.pt")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_interrupted_run_stops_cleanly_and_resumes_to_the_same_weights(
    tmp_path: Path, uninterrupted: str, sig: signal.Signals
) -> None:
    """Cases 1 and 3: SIGTERM or SIGKILL to `graftline run` while pretraining trains (and
    case 4, a second run refused meanwhile, in the SIGTERM one)."""
    repo = make_repo(tmp_path / "repo", PARAMS)
    # DVC runs a stage's command through $SHELL, /bin/sh when unset (as under CI). dash stays
    # between DVC and the stage, so the stage's parent outlives the killed flow: the harder case.
    env = env_for(repo, tmp_path / "home", SHELL="/bin/sh")
    log = tmp_path / "first.log"
    run = start_graftline(repo, env, "run", "--until", "pretrain", log=log)
    # One line per event on the console: time, the stage, its epoch line with the ETA.
    epoch_line = rf"\d\d:\d\d:\d\d pretrain +pretrain epoch {EPOCHS // 10}/{EPOCHS}: .* eta \d"
    wait_for_line(log, epoch_line, run)
    stage = stage_processes(repo)
    assert stage, "the pretrain stage process was not found"
    # The log reaches this test through the flow and Prefect's logger, a little behind the
    # stage. Hold the stage still while the signal goes out, so that it is surely mid-training
    # (its last epoch checkpoint says where), however loaded the machine is.
    for p in stage:
        p.suspend()
    checkpoint = repo / ".graftline/checkpoints/pretrain/last.pt"
    assert torch.load(checkpoint, weights_only=True)["state"]["epoch"] + 1 < EPOCHS
    if sig == signal.SIGTERM:
        # Case 4: a second `graftline run` in the same checkout refuses at once, by name,
        # and the first goes on (until the signal below).
        second = graftline(repo, env, "run", "--until", "pretrain")
        assert second.returncode == 2, second.stdout + second.stderr
        assert "another pipeline is running in this checkout" in second.stderr
        assert f"pid {run.pid}" in second.stderr
        assert run.poll() is None, "the first run must go on"
    run.send_signal(sig)
    for p in stage:
        p.resume()
    assert run.wait(timeout=60) != 0
    # The stage process goes with the command, whichever signal it got.
    _, alive = psutil.wait_procs(stage, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    statuses = mlflow_statuses(repo)
    assert ("pretrain", "KILLED") in statuses, statuses
    if sig == signal.SIGTERM:  # the command itself closed its runs, Prefect's flow run too
        assert ("pipeline", "KILLED") in statuses and ("pipeline", "RUNNING") not in statuses
        assert re.search(r"flow +Finished in state (Crashed|Cancelled)", log.read_text())
    # No half-written output: DVC removed the stage's outs before it ran, none came back.
    assert not (repo / "models/pretrained/model.pt").exists()
    assert list((repo / ".graftline/checkpoints").rglob("*.pt")), "no resume checkpoint"
    # DVC's lock is free: status answers and says pretraining must run again.
    status = dvc(repo, env, "status", "pretrain")
    assert status.returncode == 0, status.stderr
    assert "pretrain" in status.stdout
    # After kill -9, DVC itself drops the dead pid from its read/write lock (it says so).
    assert "unable to acquire lock" not in status.stderr.lower()
    assert "busy" not in status.stderr.lower()

    # The rerun closes what the killed one left open, resumes, and lands on the same weights.
    log2 = tmp_path / "second.log"
    # (`--until pretrain`: the stages after it are not what this case is about.)
    rerun = start_graftline(repo, env, "run", "--until", "pretrain", log=log2)
    assert rerun.wait(timeout=300) == 0, log2.read_text()[-4000:]
    assert "resuming after epoch" in log2.read_text()
    assert "gate      not run (--until pretrain)" in log2.read_text()
    assert not (repo / "models/finetuned").exists(), "a stage after --until ran"
    assert sha256_of(repo / "models/pretrained/model.pt") == uninterrupted
    statuses = mlflow_statuses(repo)
    assert not [s for s in statuses if s[1] == "RUNNING"], statuses


def test_a_burst_of_signals_cannot_leave_the_stage_run_open(tmp_path: Path) -> None:
    """Stopping a stage often signals it more than once (the flow stops it and the shell DVC
    ran it through, whose death sends PR_SET_PDEATHSIG; a group signal adds one). The first
    signal stops it; the rest must not interrupt the clean-up that closes its MLflow run."""
    repo = make_repo(tmp_path / "repo", PARAMS)
    env = env_for(repo, tmp_path / "home")
    assert dvc(repo, env, "repro", "preprocess").returncode == 0
    stage = subprocess.Popen(
        [sys.executable, "-m", "tasks.pretrain"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    checkpoint = repo / ".graftline/checkpoints/pretrain/last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        assert stage.poll() is None, stage.communicate()[0][-3000:]
        time.sleep(0.1)
    assert ("pretrain", "RUNNING") in mlflow_statuses(repo)
    signals = 0
    while stage.poll() is None and signals < 2000:  # one every 5 ms until it has gone
        stage.send_signal(signal.SIGTERM if signals % 2 == 0 else signal.SIGINT)
        signals += 1
        time.sleep(0.005)
    output = stage.communicate(timeout=60)[0]
    assert stage.returncode == 130, output[-3000:]
    assert signals > 1, "it ended before a second signal"
    assert "Traceback" not in output, output[-3000:]
    # The first handled: SIGTERM, or SIGINT where both were pending at once (CPython runs
    # pending handlers in signal-number order, and SIGINT is 2).
    assert re.search(r"graftline pretrain: stopped by SIG(TERM|INT)\n", output), output[-3000:]
    assert len(re.findall(r"stopped by SIG", output)) == 1, output[-3000:]
    assert [s for s in mlflow_statuses(repo) if s[0] == "pretrain"] == [("pretrain", "KILLED")]
    assert not (repo / "models/pretrained/model.pt").exists()


# Trains a model whose checkpoint (weights + Adam state, ~50 MB) takes longer to write than an
# epoch takes to train, so that a kill at a random moment most likely lands mid-write.
_TRAINER = """
import sys, torch
from graftline.config import TrainConfig
from graftline.data.dataset import Dataset
from graftline.models import build_classifier
from graftline.train import fit
from tests.conftest import blob_digits

torch.manual_seed(0)
x, y = blob_digits(8, classes=2)
data = Dataset(x[:, None], y.astype("int64"), ["0", "1"], "blobs")
model = build_classifier(
    {"arch": "cnn", "channels": [4, 8], "hidden": 4096, "dropout": 0.0}, 1, 28, 2
)
cfg = TrainConfig(epochs=int(sys.argv[3]), batch_size=16, lr=1e-3, num_threads=1)
result = fit(model, data, None, cfg, seed=0, resume_path=sys.argv[1], fingerprint="f",
             progress=False)
torch.save(model.state_dict(), sys.argv[2])
print("resumed_from", result.resumed_from)
"""


def test_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path: Path) -> None:
    """Case 2: SIGKILL at random moments of a run that mostly writes checkpoints: the resume
    checkpoint is always whole, the rerun resumes from it, and ends as if never killed."""
    epochs = "12"
    env = tool_env(Path.cwd())

    def trainer(ckpt: Path, out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _TRAINER, str(ckpt), str(out), epochs],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    reference = tmp_path / "reference.pt"
    done = trainer(tmp_path / "reference-ckpt.pt", reference)
    assert done.wait(timeout=300) == 0, done.stdout.read() if done.stdout else ""

    ckpt, out = tmp_path / "resume.pt", tmp_path / "final.pt"
    rng = random.Random(0)
    kills = 0
    while kills < 5:
        proc = trainer(ckpt, out)
        while not ckpt.exists() and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 0.6))
        if proc.poll() is not None:
            break  # it finished first
        proc.kill()
        proc.wait()
        kills += 1
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # whole, or this fails
        assert state["state"]["epoch"] >= 0
    assert kills >= 1, "the run never got killed"
    last = trainer(ckpt, out)
    output = last.communicate(timeout=300)[0]
    assert last.returncode == 0, output
    assert "resumed_from None" not in output, output
    # What the killed writers left half-written beside it is gone too.
    assert not list(tmp_path.glob(f".{ckpt.name}.*.tmp"))
    a = torch.load(reference, weights_only=True)
    b = torch.load(out, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended elsewhere"
