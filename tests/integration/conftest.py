"""Small real models of known quality, registered in a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graftline import layout as paths
from graftline import tracking
from graftline.config import Augment, Params, TrainConfig, parse_params
from graftline.data.dataset import Dataset
from graftline.data.store import save_splits
from graftline.models import build_classifier, save_checkpoint
from graftline.train import fit
from tasks import deploy
from tests.conftest import ROOT, blob_digits

MODEL = {"arch": "cnn", "channels": [8, 16], "hidden": 32, "dropout": 0.0}
PARAMS = parse_params({"deploy": {"model_name": "blobs", "gate": {"min_accuracy": 0.5}}})


def blobs(n: int, seed: int) -> Dataset:
    x, y = blob_digits(n, classes=3, seed=seed)
    return Dataset(x[:, None], y.astype(np.int64), ["0", "1", "2"], "blobs")


@pytest.fixture(scope="session")
def trained() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_classifier(MODEL, 1, 28, 3)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=3e-3, augment=Augment(shift=0.05))
    fit(model, blobs(30, 0), blobs(10, 1), cfg, seed=0, progress=False)
    return model


def write_model(root: Path, model: torch.nn.Module, dead_classes: list[int]) -> None:
    """The trained model, with some classes never predicted: a model of known quality."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in dead_classes:
        state["head.bias"][k] = -1e4
    net = build_classifier(MODEL, 1, 28, 3)
    net.load_state_dict(state)
    _save(root, net, MODEL)


def train_and_write(
    root: Path,
    model_cfg: dict,
    train: Dataset,
    val: Dataset,
    epochs: int,
    transform: dict | None = None,
) -> None:
    """A seeded classifier of ``model_cfg`` trained on ``train``, written where `finetune`
    writes its model (with ``transform`` as its recorded input transform)."""
    torch.manual_seed(0)
    model = build_classifier(model_cfg, 1, 28, 3)
    fit(model, train, val, TrainConfig(epochs=epochs, batch_size=16, lr=3e-3), seed=0)
    _save(root, model, model_cfg, transform)


def _save(
    root: Path, model: torch.nn.Module, model_cfg: dict, transform: dict | None = None
) -> None:
    save_checkpoint(
        root / paths.FINETUNED / paths.MODEL_FILE,
        model,
        model_config=model_cfg,
        classes=["0", "1", "2"],
        input_shape=(1, 28, 28),
        transform=transform,
    )


def deploy_once(root: Path, params: Params = PARAMS) -> dict:
    with tracking.stage_run("deploy", params.deploy.model_dump(), root):
        return deploy.run(params, root)


@pytest.fixture
def sqlite_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A work folder with a task test split and its own SQLite tracking store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "serve-tests")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    save_splits(tmp_path / paths.TASK_DATA, {"test": blobs(40, 7)}, {})
    tracking.configure(tmp_path)
    return tmp_path


def graftline_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The `graftline` command, run as a user would, in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "graftline.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )


def word_texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Short texts whose class is the sentiment of their words (three classes)."""
    rng = np.random.default_rng(seed)
    words = [["good", "great", "lovely"], ["bad", "awful", "stale"], ["ok", "fine", "average"]]
    y = rng.integers(0, 3, n)
    texts = [" ".join(rng.choice(words[k], 4)) + " coffee 好" for k in y]
    return texts, y.astype(np.int64)


@pytest.fixture
def text_root(sqlite_root: Path, request: pytest.FixtureRequest) -> Path:
    """``sqlite_root`` with a small trained text classifier (a Llama-style decoder over a
    tokenizer trained on its texts) registered as the champion of ``blob-texts``, and a
    tokenized test split that keeps its texts. Parametrized indirectly with ``True``, the
    classifier carries naive Bayes + EM over its training texts (``finetune.nb_em``)."""
    from graftline.config import TokenizerParams
    from graftline.data.text import encode, token_spec, tokenize_dataset, train_tokenizer
    from graftline.models.text import text_model_config

    texts, y = word_texts(90, 0)
    p = TokenizerParams(vocab_size=300, max_len=16)
    tok = train_tokenizer(texts, p)
    spec = token_spec(tok, p, int((encode(tok, texts, 16, 0)[0] != 0).sum()))
    item = np.empty(len(texts), dtype=object)
    item[:] = texts
    ds, _ = tokenize_dataset(Dataset(item, y, ["0", "1", "2"], "words"), tok, spec)
    save_splits(
        sqlite_root / paths.TASK_DATA, {"test": ds.subset(np.arange(60, 90))}, {}, texts=True
    )
    cfg = {"arch": "llama", "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0}
    cfg = text_model_config({**cfg, "dropout": 0.0, "pool": "last"}, spec)
    torch.manual_seed(0)
    model = build_classifier(cfg, 1, 16, 3)
    train = ds.subset(np.arange(60))
    fit(model, train, train, TrainConfig(epochs=3, batch_size=16, lr=3e-3), seed=0)
    if getattr(request, "param", False):
        from graftline.nb_em import fit_nb_em

        model.words = fit_nb_em(texts[:60], y[:60], texts[:60], 3, min_df=1)
    save_checkpoint(
        sqlite_root / paths.FINETUNED / paths.MODEL_FILE,
        model,
        model_config=cfg,
        classes=["0", "1", "2"],
        input_shape=(16,),
        transform=spec,
    )
    params = parse_params({"deploy": {"model_name": "blob-texts", "gate": {"min_accuracy": 0.0}}})
    deploy_once(sqlite_root, params)
    return sqlite_root
