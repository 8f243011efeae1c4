"""Cases 14 and 15: the registry loses the champion's artifact, or stops answering, while
`graftline serve` serves it: answers go on from the loaded model, and /ready and /model say
what is wrong."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from graftline import tracking
from graftline.serve.app import create_app
from graftline.serve.champion import ChampionFollower
from tests.conftest import mlflow_server
from tests.integration.conftest import (  # noqa: F401 - fixtures shared with integration
    blobs,
    deploy_once,
    sqlite_root,
    trained,
    write_model,
)

IMAGE = {"inputs": [blobs(1, 3).images[0, 0].tolist()]}


def _serving(client: MlflowClient) -> tuple[ChampionFollower, TestClient]:
    follower = ChampionFollower("blobs", client, poll_seconds=3600)  # refreshed by hand
    return follower, TestClient(create_app(follower))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_champion_artifact_lost_while_serving(
    sqlite_root: Path, trained: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.delenv("GRAFTLINE_API_TOKEN", raising=False)
    write_model(sqlite_root, trained, dead_classes=[])
    version = deploy_once(sqlite_root)["version"]
    follower, service = _serving(MlflowClient())
    with service:
        assert service.get("/ready").json() == {
            "ready": True,
            "model_name": "blobs",
            "model_version": version,
            "input": "image",
            "runtime": "torch",
        }
        location = MlflowClient().get_model_version_download_uri("blobs", version)
        stored = list(Path(urlparse(location).path).rglob("model.pt"))
        assert stored, "no stored checkpoint found"
        for p in stored:  # the registry's copy, not the one loaded in memory
            if damage == "deleted":
                p.unlink()
            else:
                p.write_bytes(p.read_bytes()[:100])
        follower.refresh()
        ready = service.get("/ready")
        assert ready.status_code == 200
        warning = ready.json()["warning"]
        assert f"still serving v{version}" in warning
        assert ("is gone" if damage == "deleted" else "changed size") in warning
        assert service.get("/model").json()["warning"] == warning
        answer = service.post("/predict", json=IMAGE)
        assert answer.status_code == 200 and answer.json()["model_version"] == version


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    with mlflow_server(tmp_path) as running:
        yield running


def test_registry_unreachable_while_serving(
    sqlite_root: Path,
    trained: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    server: tuple[str, subprocess.Popen],
) -> None:
    url, process = server
    monkeypatch.delenv("GRAFTLINE_API_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    tracking.configure(sqlite_root)
    write_model(sqlite_root, trained, dead_classes=[])
    version = deploy_once(sqlite_root)["version"]
    follower, service = _serving(MlflowClient(tracking_uri=url))
    with service:
        assert service.get("/ready").json()["model_version"] == version
        # No retries and a short timeout from here on: for the dead server, not for the
        # registration above (a loaded machine's fresh server may take seconds to answer).
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
        os.killpg(process.pid, signal.SIGKILL)  # the tracking server dies under the service
        process.wait()
        follower.refresh()
        ready = service.get("/ready")
        assert ready.status_code == 200
        assert "the registry does not answer" in ready.json()["warning"]
        for _ in range(5):
            answer = service.post("/predict", json=IMAGE)
            assert answer.status_code == 200 and answer.json()["model_version"] == version
        assert os.environ["MLFLOW_TRACKING_URI"] == url
