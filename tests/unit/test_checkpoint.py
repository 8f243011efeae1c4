from pathlib import Path

import numpy as np
import pytest
import torch

from graftline.errors import ArtifactError
from graftline.models import build_classifier, load_checkpoint, save_checkpoint
from graftline.train import predict_proba

MODEL = {"arch": "cnn", "channels": [4, 8], "hidden": 16, "dropout": 0.0}


def test_checkpoint_rebuilds_the_same_model(tmp_path: Path) -> None:
    model = build_classifier(MODEL, 1, 28, 3)
    save_checkpoint(
        tmp_path / "m.pt",
        model,
        model_config=MODEL,
        classes=["a", "b", "c"],
        input_shape=(1, 28, 28),
        extra={"stage": "pretrain"},
    )
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["classes"] == ["a", "b", "c"] and ckpt["stage"] == "pretrain"
    x = np.random.default_rng(0).integers(0, 255, (5, 1, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(predict_proba(model, x), predict_proba(loaded, x))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    torch.save(build_classifier(MODEL, 1, 28, 3), tmp_path / "pickled.pt")
    with pytest.raises(ArtifactError, match="pickled.pt: cannot load checkpoint safely"):
        load_checkpoint(tmp_path / "pickled.pt")


def test_missing_and_foreign_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ArtifactError, match="not a graftline checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_unknown_architecture_or_missing_key() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'rnn'"):
        build_classifier({**MODEL, "arch": "rnn"}, 1, 28, 3)
    with pytest.raises(ValueError, match="'vit' model config lacks 'patch_size'"):
        build_classifier({**MODEL, "arch": "vit"}, 1, 28, 3)


def test_same_weights_give_the_same_file(tmp_path: Path) -> None:
    """DVC hashes files: a checkpoint of identical weights must be byte-identical."""
    torch.manual_seed(0)
    model = build_classifier(MODEL, 1, 28, 3)
    for name in ("a.pt", "b.pt"):
        save_checkpoint(
            tmp_path / name,
            model,
            model_config=MODEL,
            classes=["a", "b", "c"],
            input_shape=(1, 28, 28),
        )
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
