"""The processed store: a memory-mapped corpus is read a batch at a time without mapping it
into the process, trains to the same weights as in memory, and keeps no list of ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graftline.config import TrainConfig
from graftline.data.dataset import Dataset, NumberedIds
from graftline.data.store import load_split, save_splits
from graftline.errors import ArtifactError
from graftline.io import read_rows
from graftline.models import build_classifier
from graftline.train import fit
from tests.conftest import blob_digits


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status here")


def _blobs(n_per_class: int, seed: int, source: str = "blobs") -> Dataset:
    x, y = blob_digits(n_per_class, classes=3, seed=seed)
    return Dataset(x[:, None], y.astype(np.int64), ["0", "1", "2"], source)


@pytest.fixture
def corpus(tmp_path: Path) -> np.memmap:
    """64 MB of uint8 rows in a .npy file, memory-mapped as load_split maps it."""
    rng = np.random.default_rng(0)
    a = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.uint8, (80_000, 1, 28, 28))
    for i in range(0, len(a), 20_000):
        a[i : i + 20_000] = rng.integers(0, 256, (20_000, 1, 28, 28), dtype=np.uint8)
    a.flush()
    del a
    return np.load(tmp_path / "x.npy", mmap_mode="r")


def test_rows_read_from_a_memory_mapped_file_equal_indexing(corpus: np.memmap) -> None:
    index = np.random.default_rng(1).integers(0, len(corpus), 300)
    index[:2] = [-1, 0]
    got = read_rows(corpus, index)
    assert got.flags.c_contiguous and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(corpus)[index])
    # a view of the mapping (a slice) starts elsewhere in the file
    view = corpus[1000:2000]
    np.testing.assert_array_equal(
        read_rows(view, np.array([0, 999, 5])), corpus[[1000, 1999, 1005]]
    )
    with pytest.raises(IndexError):
        read_rows(corpus, np.array([len(corpus)]))


def test_reading_batches_does_not_map_the_corpus_into_the_process(corpus: np.memmap) -> None:
    """Indexing the mapping maps the pages around each row (whole folios of the page cache on
    recent kernels); read_rows leaves the process's file-backed resident set where it was."""
    rng = np.random.default_rng(2)
    before = _rss_file_mb()
    for _ in range(20):
        read_rows(corpus, rng.integers(0, len(corpus), 512))
    assert _rss_file_mb() - before < 8, "reading 10,240 rows mapped the file into memory"


def test_a_truncated_corpus_is_a_clear_error(tmp_path: Path) -> None:
    a = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.uint8, (100, 4))
    a[:] = 7
    a.flush()
    del a
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    with (tmp_path / "x.npy").open("r+b") as f:
        f.truncate(f.seek(0, 2) - 40)  # the last 10 rows are gone
    with pytest.raises(ArtifactError, match=r"x\.npy: short read at row 95"):
        read_rows(mapped, np.array([3, 95]))


def test_memory_mapped_training_gives_the_in_memory_weights(tmp_path: Path) -> None:
    train, val = (_blobs(n, seed) for n, seed in ((100, 3), (20, 4)))
    save_splits(tmp_path / "data", {"train": train, "val": val}, {})
    mapped = load_split(tmp_path / "data", "train", mmap=True)
    assert isinstance(mapped.images, np.memmap)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.003, schedule="none", num_threads=1)
    weights = []
    for ds in (train, mapped):
        torch.manual_seed(0)
        model = build_classifier(
            {"arch": "cnn", "channels": [4, 8], "hidden": 16, "dropout": 0.0}, 1, 28, 3
        )
        fit(model, ds, val, cfg, seed=0, progress=False)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_numbered_ids_are_made_on_demand_and_not_stored(tmp_path: Path) -> None:
    ds = _blobs(17, 5, "digits.idx").subset(np.arange(50))
    ds = Dataset(ds.images, ds.labels, ds.classes, "digits.idx")  # ids numbered anew
    assert isinstance(ds.ids, NumberedIds) and len(ds.ids) == 50
    assert ds.ids[0] == "digits.idx[0]" and ds.ids[-1] == "digits.idx[49]"
    assert ds.ids[48:] == ["digits.idx[48]", "digits.idx[49]"]
    assert ds.subset(np.array([7, 2])).ids == ["digits.idx[7]", "digits.idx[2]"]
    named = Dataset(ds.images[:2], ds.labels[:2], ds.classes, "digits.idx", ids=["a.png", "b.png"])
    save_splits(tmp_path / "data", {"train": ds, "named": named}, {})
    with np.load(tmp_path / "data/train.npz") as z:
        assert z["ids"].size == 0
    assert list(load_split(tmp_path / "data", "train").ids) == list(ds.ids)
    assert list(load_split(tmp_path / "data", "named").ids) == ["a.png", "b.png"]
