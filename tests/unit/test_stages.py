"""The training stages are reproducible: same params and data, same weights, whatever the
process's random state was before."""

from pathlib import Path

import numpy as np
import torch

from graftline.config import parse_params
from graftline.data.dataset import Dataset
from graftline.data.store import save_splits
from graftline.models.checkpoint import read_checkpoint
from tasks import finetune, pretrain
from tests.conftest import blob_digits

PARAMS = parse_params(
    {
        "pretrain": {
            "model": {"channels": [4, 8], "hidden": 16},
            "train": {
                "epochs": 2,
                "batch_size": 16,
                "num_threads": 1,
                "augment": {"shift": 0.1, "lowres_prob": 0.5},
            },
        },
        "finetune": {
            "strategy": "gradual",
            "head_epochs": 1,
            "train": {"epochs": 2, "batch_size": 8, "num_threads": 1},
        },
    }
)


def blobs(n: int, seed: int) -> Dataset:
    x, y = blob_digits(n, classes=3, seed=seed)
    return Dataset(x[:, None], y.astype(np.int64), ["0", "1", "2"], "blobs")


def weights(path: Path) -> list[torch.Tensor]:
    return list(read_checkpoint(path)["state_dict"].values())


def test_pretrain_and_finetune_are_reproducible(tmp_path: Path) -> None:
    save_splits(tmp_path / "pre", {"train": blobs(12, 0), "val": blobs(4, 1)}, {})
    save_splits(
        tmp_path / "task", {"train": blobs(3, 2), "val": blobs(3, 3), "test": blobs(3, 4)}, {}
    )
    runs = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # a different global random state before each run
        out = tmp_path / f"run{i}"
        pretrain.run(
            PARAMS,
            data=tmp_path / "pre",
            out=out / "pre",
            reports=out / "rp",
            checkpoints=out / "ck",
        )
        finetune.run(
            PARAMS,
            data=tmp_path / "task",
            pretrained=out / "pre",
            finetuned_out=out / "ft",
            scratch_out=out / "sc",
            reports=out / "rf",
            checkpoints=out / "ck",
        )
        runs.append(out)
    for model in ("pre", "ft", "sc"):
        a, b = (weights(r / model / "model.pt") for r in runs)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), model
    assert (runs[0] / "rf" / "finetuned_history.csv").read_text() == (
        runs[1] / "rf" / "finetuned_history.csv"
    ).read_text()
