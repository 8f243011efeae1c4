"""Natural images end to end: coloured shapes on light, textured backgrounds (RGB, RGBA and
JPEG files of mixed sizes) train through the flow; serving, batch prediction and evaluate
read the same files the same way (no inversion guessed at serving time)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from PIL import Image, ImageDraw

from flows.pipeline import pipeline
from graftline import tracking
from graftline.serve.app import create_app
from graftline.serve.champion import ChampionFollower
from tests.conftest import make_repo
from tests.integration.conftest import graftline_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

SHAPES = ("circle", "square", "triangle")


def shape_image(kind: str, rng: np.random.Generator) -> Image.Image:
    """A shape of a random dark-ish colour on a light, noisy, graded background."""
    w, h = (int(v) for v in rng.integers(40, 97, size=2))
    base = rng.integers(180, 240, size=3)
    grade = np.linspace(-20, 20, w)[None, :, None]
    noise = rng.normal(0, 12, size=(h, w, 3))
    bg = np.clip(base + grade + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in rng.integers(0, 150, size=3))
    side = min(w, h) * rng.uniform(0.45, 0.7)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    r = side / 2
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def write_shapes(root: Path, per_class: int, seed: int) -> Path:
    """``root/<shape>/<i>.png|jpg``: a third RGB PNG, a third RGBA PNG, a third JPEG."""
    rng = np.random.default_rng(seed)
    for kind in SHAPES:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            img = shape_image(kind, rng)
            if i % 3 == 0:
                img.save(root / kind / f"{i}.png")
            elif i % 3 == 1:
                img.convert("RGBA").save(root / kind / f"{i}.png")
            else:
                img.save(root / kind / f"{i}.jpg", quality=90)
    return root


def photo_params(corpus: Path, task: Path) -> dict:
    folder = {"kind": "folder", "fit": "resize"}
    # the light backgrounds' statistics, normalised by the backbone (recorded with the model)
    norm = {"mean": [0.75, 0.75, 0.75], "std": [0.25, 0.25, 0.25]}
    cnn = {"channels": [8, 16], "hidden": 32, "batch_norm": True, "normalize": norm}
    return {
        "preprocess": {
            "seed": 0,
            "image_size": 32,
            "channels": 3,
            "pretrain": {"source": {**folder, "path": str(corpus)}},
            "task": {"source": {**folder, "path": str(task)}, "labels_per_class": 12},
        },
        "pretrain": {
            "model": cnn,
            "train": {"epochs": 6, "batch_size": 32, "lr": 0.003, "num_threads": 1},
        },
        "finetune": {
            "strategy": "full",
            "train": {"epochs": 15, "batch_size": 12, "lr": 0.003, "num_threads": 1},
        },
        "distill": {"enabled": False},
        "evaluate": {"svc": {"C": 5.0}},
        "deploy": {"gate": {"min_accuracy": 0.5}},  # model_name: derived from the task
    }


def test_photos_train_through_the_flow_and_serve_as_evaluated(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path_factory.mktemp("photos")
    corpus = write_shapes(data / "corpus", 40, seed=1)
    task = write_shapes(data / "shapes", 30, seed=2)
    repo = make_repo(tmp_path_factory.mktemp("photorepo"), photo_params(corpus, task))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.EXPERIMENT_ENV, raising=False)
    monkeypatch.delenv("GRAFTLINE_API_TOKEN", raising=False)

    result = pipeline(root=str(repo))
    assert result["deploy"]["promoted"], result["deploy"]["decision"]
    name = "graftline-shapes"  # the task folder's name
    evaluated = pd.read_csv(repo / "reports/evaluate/predictions.csv").set_index("id")
    accuracy = float((evaluated["finetuned"] == evaluated["actual"]).mean())
    assert accuracy > 0.6, accuracy  # far above chance (1/3): the photos were learnt

    # The test split's own files: through `graftline predict` and the service.
    test_files = data / "test_files"
    for rel in evaluated.index:
        (test_files / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(task / rel, test_files / rel)
    out = repo / "predicted.csv"
    done = graftline_cli(repo, "predict", str(test_files), "--out", str(out))
    assert done.returncode == 0, done.stderr
    predicted = pd.read_csv(out).set_index("file")

    tracking.configure(repo)
    follower = ChampionFollower(name, MlflowClient(), poll_seconds=3600)
    with TestClient(create_app(follower)) as c:
        model = c.get("/model").json()
        assert model["transform"]["polarity"] == "keep" and model["transform"]["fit"] == "resize"
        files = [
            ("files", (rel, (task / rel).read_bytes(), "application/octet-stream"))
            for rel in evaluated.index
        ]
        answer = c.post("/predict/image", files=files)
        assert answer.status_code == 200, answer.text
        served = [p["class"] for p in answer.json()["predictions"]]

    assert served == [predicted.loc[rel, "class"] for rel in evaluated.index]
    assert served == evaluated["finetuned"].astype(str).tolist()
    truth = evaluated["actual"].astype(str).tolist()
    served_acc = sum(a == b for a, b in zip(served, truth, strict=True)) / len(truth)
    print(f"photos: {len(truth)} test files, evaluated {accuracy:.3f}, served {served_acc:.3f}")
