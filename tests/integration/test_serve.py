"""The HTTP service against a real MLflow store: readiness, predictions, bad input, auth,
following the champion alias, OpenAPI, and batch prediction."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from PIL import Image

from graftline.errors import ArtifactError
from graftline.registry import Registry
from graftline.serve.app import create_app
from graftline.serve.champion import ChampionFollower
from tests.integration.conftest import (
    blobs,
    deploy_once,
    graftline_cli,
    train_and_write,
    write_model,
)


def client_for(
    root: Path, token: str | None = None, runtime: str = "torch", **kw: int
) -> TestClient:
    follower = ChampionFollower("blobs", MlflowClient(), poll_seconds=3600, runtime=runtime)
    return TestClient(create_app(follower, token=token, **kw))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_no_champion_yet(sqlite_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFTLINE_API_TOKEN", raising=False)
    with client_for(sqlite_root) as c:
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready")
        assert ready.status_code == 503 and "no champion" in ready.json()["reason"]
        r = c.post("/predict", json={"inputs": [[0.0] * 784]})
        assert r.status_code == 503 and "no champion" in r.json()["detail"]


def test_predictions_bad_input_and_alias_following(
    sqlite_root: Path, trained: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRAFTLINE_API_TOKEN", raising=False)
    write_model(sqlite_root, trained, dead_classes=[2])
    v1 = deploy_once(sqlite_root)["version"]
    test = blobs(10, 21)
    with client_for(sqlite_root, max_batch=8, max_upload_bytes=200_000) as c:
        ready = {"ready": True, "model_name": "blobs", "model_version": v1, "input": "image"}
        ready["runtime"] = "torch"
        assert c.get("/ready").json() == ready
        one = c.post("/predict", json={"inputs": [test.images[0, 0].tolist()]}).json()
        assert one["model_version"] == v1 and len(one["predictions"]) == 1
        assert len(one["predictions"][0]["top"]) == 3
        flat = [img.ravel().tolist() for img in test.images[:8]]
        batch = c.post("/predict", json={"inputs": flat}).json()["predictions"]
        truth = [test.classes[i] for i in test.labels[:8]]
        assert sum(p["class"] == t for p, t in zip(batch, truth, strict=True)) >= 4
        assert all(p["class"] != "2" for p in batch)  # v1 never predicts class 2

        # an upload of any size and mode, dark ink on white paper
        paper = 255 - np.kron(test.images[0, 0], np.ones((3, 3)))
        up = c.post("/predict/image", files=[("files", ("d.png", png(paper), "image/png"))])
        assert up.status_code == 200 and up.json()["model_version"] == v1
        two = c.post(
            "/predict",
            files=[
                ("files", ("a.png", png(paper), "image/png")),
                ("files", ("b.jpg", png(paper[::2, ::2]), "image/png")),
            ],
        )
        assert two.status_code == 200 and len(two.json()["predictions"]) == 2

        bad = {
            "wrong shape": ({"inputs": [[1.0] * 10]}, 400, "does not fit"),
            "non-numeric": ({"inputs": [["a"] * 784]}, 400, "not a numeric array"),
            "ragged": ({"inputs": [[[1, 2], [3]]]}, 400, "inputs[0]"),
            "empty": ({"inputs": []}, 400, "empty"),
            "too many": ({"inputs": [[0.0] * 784] * 9}, 413, "over the limit of 8"),
            "out of range": ({"inputs": [[300.0] * 784]}, 400, "[0, 255]"),
            "missing key": ({"images": []}, 422, "inputs"),
        }
        for name, (body, status, needle) in bad.items():
            r = c.post("/predict", json=body)
            assert r.status_code == status and needle in r.json()["detail"], name
        nan = c.post(
            "/predict",
            content=b'{"inputs": [[NaN' + b", 0" * 783 + b"]]}",
            headers={"content-type": "application/json"},
        )
        assert 400 <= nan.status_code < 500
        assert c.post("/predict", content=b"{not json").status_code == 422
        huge = c.post("/predict", content=b" " * 300_000)
        assert huge.status_code == 413
        junk = c.post("/predict/image", files=[("files", ("x.png", b"garbage", "image/png"))])
        assert junk.status_code == 400 and "x.png: not a decodable image" in junk.json()["detail"]
        assert c.get("/ready").status_code == 200  # still serving

        info = c.get("/model").json()
        assert info["version"] == v1 and "graftline.git_commit" in info["tags"]

        # promote a better model: the service switches, every answer names its version
        write_model(sqlite_root, trained, dead_classes=[])
        v2 = deploy_once(sqlite_root)["version"]
        assert Registry("blobs").champion_version() == v2
        # the follower polls hourly here; ask it now, as its timer would
        assert (
            _refresh(c) and c.post("/predict", json={"inputs": flat}).json()["model_version"] == v2
        )
        Registry("blobs").rollback("test")
        assert (
            _refresh(c) and c.post("/predict", json={"inputs": flat}).json()["model_version"] == v1
        )


def _refresh(c: TestClient) -> bool:
    return c.app.state.follower.refresh()


def test_bearer_token(sqlite_root: Path, trained: torch.nn.Module) -> None:
    write_model(sqlite_root, trained, dead_classes=[])
    deploy_once(sqlite_root)
    with client_for(sqlite_root, token="s3cret") as c:
        body = {"inputs": [[0.0] * 784]}
        assert c.post("/predict", json=body).status_code == 401
        assert (
            c.post("/predict", json=body, headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        assert (
            c.post("/predict", json=body, headers={"Authorization": "Bearer s3cret"}).status_code
            == 200
        )
        assert c.get("/model").status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200


def test_openapi_describes_every_endpoint(sqlite_root: Path) -> None:
    with client_for(sqlite_root) as c:
        spec = c.get("/openapi.json").json()
    assert {"/predict", "/predict/image", "/health", "/ready", "/model"} <= set(spec["paths"])
    post = spec["paths"]["/predict"]["post"]
    assert "400" in post["responses"]
    assert {"application/json", "multipart/form-data"} <= set(post["requestBody"]["content"])


def test_batch_predict_cli(sqlite_root: Path, trained: torch.nn.Module) -> None:
    write_model(sqlite_root, trained, dead_classes=[])
    version = deploy_once(sqlite_root)["version"]
    (sqlite_root / "params.yaml").write_text(json.dumps({"deploy": {"model_name": "blobs"}}))
    folder = sqlite_root / "in"
    folder.mkdir()
    test = blobs(3, 31)
    for i, img in enumerate(test.images[:, 0]):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    csv = sqlite_root / "in.csv"
    header = "id," + ",".join(f"p{i}" for i in range(784))
    csv.write_text(
        "\n".join(
            [header]
            + [
                f"x{i}," + ",".join(map(str, img.ravel()))
                for i, img in enumerate(test.images[:, 0])
            ]
        )
        + "\n"
    )

    def cli(*args: str) -> subprocess.CompletedProcess:
        return graftline_cli(sqlite_root, *args)

    for src, out in ((folder, "a.csv"), (csv, "b.csv")):
        r = cli("predict", str(src), "--out", out)
        assert r.returncode == 0, r.stderr
        rows = (sqlite_root / out).read_text().splitlines()
        assert rows[0] == "file,class,probability,model_version" and len(rows) == 1 + len(test)
        assert all(row.endswith(f",{version}") for row in rows[1:])
    truth = [test.classes[i] for i in test.labels]
    got = [row.split(",")[1] for row in (sqlite_root / "a.csv").read_text().splitlines()[1:]]
    assert sum(g == t for g, t in zip(got, truth, strict=True)) >= 7
    # ONNX Runtime on the version's model.onnx: the same transform, the same answers
    r = cli("predict", str(folder), "--out", "onnx.csv", "--runtime", "onnx")
    assert r.returncode == 0 and "(onnx)" in r.stdout, r.stderr
    torch_rows = pd.read_csv(sqlite_root / "a.csv")
    onnx_rows = pd.read_csv(sqlite_root / "onnx.csv")
    assert onnx_rows["class"].tolist() == torch_rows["class"].tolist()
    assert (onnx_rows["probability"] - torch_rows["probability"]).abs().max() < 1e-5
    tags = MlflowClient().get_model_version("blobs", version).tags
    assert float(tags["graftline.export.onnx_max_abs_diff"]) < 1e-4
    (folder / "05.png").write_bytes(b"\x89PNG broken")
    r = cli("predict", str(folder), "--out", "c.csv")
    assert r.returncode == 2 and "05.png: unreadable or truncated image" in r.stderr
    assert not (sqlite_root / "c.csv").exists()


def _stroke(k: int, side: int, length: float, at: tuple[float, float], width: float) -> np.ndarray:
    """Class ``k`` of the blob digits (a bar at angle pi*k/3) drawn ``length`` px long at
    ``at`` (row, col) on a black ``side``x``side`` canvas, as a person would on the page."""
    yy, xx = np.mgrid[0:side, 0:side].astype(float)
    yy, xx = yy - at[0], xx - at[1]
    a = np.pi * k / 3
    d = np.abs(xx * np.sin(a) - yy * np.cos(a))
    return np.where((d < width / 2) & (np.hypot(xx, yy) < length / 2), 255, 0).astype(np.uint8)


def test_digits_drawn_small_and_off_centre_are_read_as_training_saw_them(
    sqlite_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: the model carries its input transform (here: crop to the ink, scale into
    20x20, centre by mass) from its training data to the checkpoint and the registry, and the
    service and batch prediction apply it; a digit drawn small in a corner reads right."""
    from graftline import layout as paths
    from graftline.data.dataset import Dataset
    from graftline.data.store import save_splits
    from graftline.data.transforms import apply_transform, geometry
    from tests.integration.conftest import MODEL

    monkeypatch.delenv("GRAFTLINE_API_TOKEN", raising=False)
    box = geometry("digit_box", 28, 1)

    def boxed(n: int, seed: int) -> Dataset:
        ds = blobs(n, seed)
        return Dataset(apply_transform(ds.images, box), ds.labels, ds.classes, ds.source)

    train_and_write(sqlite_root, MODEL, boxed(30, 0), boxed(10, 1), epochs=4, transform=box)
    save_splits(sqlite_root / paths.TASK_DATA, {"test": boxed(40, 7)}, {})
    version = deploy_once(sqlite_root)["version"]

    # Three of each class, small (35-60 px of a 280 px canvas), near the edges and corners.
    spots = [(45, 50), (230, 60), (60, 220), (220, 225), (140, 40), (40, 140)]
    drawings, truth = [], []
    for i in range(9):
        k, length = i % 3, 35 + 25 * (i % 2)
        drawings.append(_stroke(k, 280, length, spots[i % len(spots)], width=length / 5))
        truth.append(str(k))
    with client_for(sqlite_root) as c:
        assert c.get("/model").json()["transform"] == box
        files = [("files", (f"d{i}.png", png(d), "image/png")) for i, d in enumerate(drawings)]
        got = [p["class"] for p in c.post("/predict/image", files=files).json()["predictions"]]
        # dark ink on white paper, as a photo or a scan would bring it
        paper = [
            ("files", (f"p{i}.png", png(255 - d), "image/png")) for i, d in enumerate(drawings)
        ]
        on_paper = [p["class"] for p in c.post("/predict/image", files=paper).json()["predictions"]]
    assert sum(g == t for g, t in zip(got, truth, strict=True)) >= 8, (got, truth)
    assert on_paper == got

    # Batch prediction applies the same transform: the same answers for the same drawings.
    (sqlite_root / "params.yaml").write_text(json.dumps({"deploy": {"model_name": "blobs"}}))
    folder = sqlite_root / "drawn"
    folder.mkdir()
    for i, d in enumerate(drawings):
        Image.fromarray(d).save(folder / f"d{i}.png")
    r = graftline_cli(sqlite_root, "predict", str(folder), "--out", "drawn.csv")
    assert r.returncode == 0, r.stderr
    rows = [x.split(",") for x in (sqlite_root / "drawn.csv").read_text().splitlines()[1:]]
    assert [row[1] for row in rows] == got and {row[3] for row in rows} == {version}


def test_a_vision_transformer_goes_through_registry_and_service_like_the_cnn(
    sqlite_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10, part 1: `arch: vit` needs no special case in the checkpoint, the MLflow
    model (scored through pyfunc by the gate), the card or the service."""

    monkeypatch.delenv("GRAFTLINE_API_TOKEN", raising=False)
    vit = {"arch": "vit", "patch_size": 7, "dim": 32, "depth": 2, "heads": 4, "mlp_ratio": 2.0}
    vit |= {"dropout": 0.0, "pool": "mean"}
    train_and_write(sqlite_root, vit, blobs(30, 0), blobs(10, 1), epochs=8)
    deployed = deploy_once(sqlite_root)
    assert deployed["promoted"], deployed["decision"].reason  # the gate scored it via MLflow
    card = Registry("blobs").version(deployed["version"]).description
    assert "Backbone `vit`" in card and "**Exports.** `model.onnx`" in card
    test = blobs(10, 21)
    inputs = {"inputs": [im.ravel().tolist() for im in test.images]}
    answers = {}
    for runtime in ("torch", "onnx"):  # its model.onnx answers as PyTorch does
        with client_for(sqlite_root, runtime=runtime) as c:
            model = c.get("/model").json()
            assert (model["version"], model["runtime"]) == (deployed["version"], runtime)
            answers[runtime] = c.post("/predict", json=inputs).json()["predictions"]
    preds = [p["class"] for p in answers["torch"]]
    truth = [test.classes[i] for i in test.labels]
    assert sum(p == t for p, t in zip(preds, truth, strict=True)) >= 0.8 * len(truth)
    assert [p["class"] for p in answers["onnx"]] == preds
    for a, b in zip(answers["onnx"], answers["torch"], strict=True):
        assert abs(a["probability"] - b["probability"]) < 1e-5


def test_an_onnx_export_that_disagrees_fails_the_deploy_and_changes_nothing(
    sqlite_root: Path, trained: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exporter that writes another function than the model computes (made here by
    exporting other weights: a real wrong graph) is caught on the test items before anything
    is registered; the champion stays."""
    import graftline.export as export

    write_model(sqlite_root, trained, dead_classes=[])
    v1 = deploy_once(sqlite_root)["version"]
    real = export.export_onnx

    def wrong(model: torch.nn.Module, module: object, path: Path) -> Path:
        other = type(model)(model.backbone, 3)  # a fresh head: other logits
        torch.nn.init.normal_(other.head.weight, std=1.0)
        return real(other, module, path)

    monkeypatch.setattr(export, "export_onnx", wrong)
    write_model(sqlite_root, trained, dead_classes=[2])
    with pytest.raises(ArtifactError, match=r"logits differ from PyTorch's by .*nothing was"):
        deploy_once(sqlite_root)
    registry = Registry("blobs")
    assert registry.champion_version() == v1
    assert [str(v.version) for v in MlflowClient().search_model_versions("name = 'blobs'")] == [v1]
