"""Nothing lost under faults: each case makes the fault real and checks what is left behind.

Processes are really killed (SIGTERM, SIGKILL), servers really absent, files really bad; no
mocks. After each fault: no process left, no MLflow run left RUNNING, no half-written output,
DVC's lock released, the champion unchanged, and (where a run follows) the same weights as a
run that was never interrupted.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
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
    tool_env,
)

EPOCHS = 150  # pretraining long enough to be interrupted mid-way (~5 s on 2 cores)
PARAMS = copy.deepcopy(TINY_PARAMS)
PARAMS["pretrain"]["train"]["epochs"] = EPOCHS


# The session's Prefect server for the module's runs: a `graftline run` would otherwise
# start and stop a temporary one each time (tests/integration/test_flow.py covers that).
_PREFECT_API: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _prefect_api(prefect_api_url: str) -> Iterator[None]:
    _PREFECT_API["url"] = prefect_api_url
    yield
    _PREFECT_API.clear()


def _env(repo: Path, home: Path, **extra: str) -> dict[str, str]:
    env = tool_env(repo, PREFECT_HOME=str(home), PREFECT_API_URL=_PREFECT_API["url"], **extra)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        if key not in extra:
            env.pop(key, None)
    return env


def _graftline(repo: Path, env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "graftline.cli", *args],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for_line(log: Path, pattern: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if re.search(pattern, log.read_text()):
            return
        assert proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared:\n{log.read_text()[-4000:]}")


def _stage_processes(repo: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "tasks." in cmd and p.info["cwd"] == str(repo):
            found.append(p)
    return found


def _mlflow_statuses(repo: Path) -> list[tuple[str | None, str]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [
        (r.data.tags.get("graftline.stage"), r.info.status)
        for r in client.search_runs(experiments, max_results=1000)
    ]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The pretrained weights of a run that nobody interrupted (plain `dvc repro`)."""
    repo = make_repo(tmp_path_factory.mktemp("reference"), PARAMS)
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "pretrain"],
        cwd=repo,
        env=_env(repo, tmp_path_factory.mktemp("home")),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _sha(repo / "models/pretrained/model.pt")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_interrupted_run_stops_cleanly_and_resumes_to_the_same_weights(
    tmp_path: Path, uninterrupted: str, sig: signal.Signals
) -> None:
    """Cases 1 and 3: SIGTERM or SIGKILL to `graftline run` while pretraining trains (and
    case 4, a second run refused meanwhile, in the SIGTERM one)."""
    repo = make_repo(tmp_path / "repo", PARAMS)
    # DVC runs a stage's command through $SHELL, /bin/sh when unset (as under CI). dash stays
    # between DVC and the stage, so the stage's parent outlives the killed flow: the harder case.
    env = _env(repo, tmp_path / "home", SHELL="/bin/sh")
    log = tmp_path / "first.log"
    run = _graftline(repo, env, "run", "--until", "pretrain", log=log)
    # One line per event on the console: time, the stage, its epoch line with the ETA.
    epoch_line = rf"\d\d:\d\d:\d\d pretrain +pretrain epoch {EPOCHS // 10}/{EPOCHS}: .* eta \d"
    _wait_for_line(log, epoch_line, run)
    stage = _stage_processes(repo)
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
    statuses = _mlflow_statuses(repo)
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
    rerun = _graftline(repo, env, "run", "--until", "pretrain", log=log2)
    assert rerun.wait(timeout=300) == 0, log2.read_text()[-4000:]
    assert "resuming after epoch" in log2.read_text()
    assert "gate      not run (--until pretrain)" in log2.read_text()
    assert not (repo / "models/finetuned").exists(), "a stage after --until ran"
    assert _sha(repo / "models/pretrained/model.pt") == uninterrupted
    statuses = _mlflow_statuses(repo)
    assert not [s for s in statuses if s[1] == "RUNNING"], statuses


def test_a_burst_of_signals_cannot_leave_the_stage_run_open(tmp_path: Path) -> None:
    """Stopping a stage often signals it more than once (the flow stops it and the shell DVC
    ran it through, whose death sends PR_SET_PDEATHSIG; a group signal adds one). The first
    signal stops it; the rest must not interrupt the clean-up that closes its MLflow run."""
    repo = make_repo(tmp_path / "repo", PARAMS)
    env = _env(repo, tmp_path / "home")
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
    assert ("pretrain", "RUNNING") in _mlflow_statuses(repo)
    signals = 0
    while stage.poll() is None and signals < 2000:  # one every 5 ms until it has gone
        stage.send_signal(signal.SIGTERM if signals % 2 == 0 else signal.SIGINT)
        signals += 1
        time.sleep(0.005)
    output = stage.communicate(timeout=60)[0]
    assert stage.returncode == 130, output[-3000:]
    assert signals > 1, "it ended before a second signal"
    assert "Traceback" not in output, output[-3000:]
    assert "graftline pretrain: stopped by SIGTERM" in output
    assert [s for s in _mlflow_statuses(repo) if s[0] == "pretrain"] == [("pretrain", "KILLED")]
    assert not (repo / "models/pretrained/model.pt").exists()


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path: Path) -> None:
    """Case 5: a tracking URI nobody answers on fails within seconds, naming the URI."""
    repo = make_repo(tmp_path / "repo", PARAMS)
    uri = f"http://127.0.0.1:{free_port()}"
    env = _env(repo, tmp_path / "home", MLFLOW_TRACKING_URI=uri)
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
    proc = graftline(repo, _env(repo, tmp_path / "home"), "run")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert re.search(r"non-finite loss .* at epoch \d+, step \d+", out), out[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert client.search_registered_models() == []
    assert not (repo / "models/finetuned/model.pt").exists()
    statuses = _mlflow_statuses(repo)
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
        env=_env(repo, tmp_path / "home"),
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
                files[rel] = _sha(p)
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
    sh_env = _env(repo, tmp_path / "home")
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
    import random

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
        env = _env(repo, tmp_path / "home", MLFLOW_TRACKING_URI=url, **retries)
        log = tmp_path / "first.log"
        first = _graftline(repo, env, "run", log=log)
        _wait_for_line(log, rf"pretrain epoch {EPOCHS // 10 * 2}/{EPOCHS}", first)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        assert first.wait(timeout=180) != 0
        assert url in log.read_text() or "Connection refused" in log.read_text()
    assert not _stage_processes(repo)
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
