"""Case 8: the disk fills up while a checkpoint or an output is written. A real tmpfs of a few
megabytes (mounted for the test; it needs root, as CI has) stands in for the full disk."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from graftline.config import TrainConfig
from graftline.data.dataset import Dataset
from graftline.errors import ArtifactError
from graftline.models import build_classifier, save_checkpoint
from graftline.train import fit
from tests.conftest import blob_digits

# ~0.5 M weights: a resume checkpoint (weights + Adam's two moments) is about 6 MB.
MODEL = {"arch": "cnn", "channels": [4, 8], "hidden": 4096, "dropout": 0.0}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(small_disk: Path) -> None:
    x, y = blob_digits(8, classes=2)
    data = Dataset(x[:, None], y.astype("int64"), ["0", "1"], "blobs")
    model = build_classifier(MODEL, 1, 28, 2)
    ckpt = small_disk / "checkpoints" / "pretrain.pt"
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-3, num_threads=1)
    # Epoch 1's checkpoint fits; epoch 2's, written beside it before replacing it, does not.
    with pytest.raises(ArtifactError, match=rf"{ckpt}: no space left .*previous version is intact"):
        fit(model, data, None, cfg, seed=0, resume_path=ckpt, fingerprint="f", progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["state"]["epoch"] == 0  # the previous checkpoint, whole
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]  # no half-written file


def test_disk_full_while_writing_an_output_keeps_the_previous_one(small_disk: Path) -> None:
    out = small_disk / "models" / "model.pt"
    first = build_classifier(MODEL, 1, 28, 2)
    save_checkpoint(out, first, model_config=MODEL, classes=["0", "1"], input_shape=(1, 28, 28))
    before = out.read_bytes()
    (small_disk / "filler").write_bytes(b"\0" * (10 * 2**20 - 2 * len(before) + 2**20))
    second = build_classifier({**MODEL, "hidden": 4097}, 1, 28, 2)
    with pytest.raises(ArtifactError, match=rf"{out}: no space left"):
        save_checkpoint(
            out, second, model_config=MODEL, classes=["0", "1"], input_shape=(1, 28, 28)
        )
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt"]
