import numpy as np
import pytest

from graftline.data.dataset import Dataset
from graftline.data.splits import label_budget, stratified_split
from graftline.errors import DataError


def make(counts: list[int]) -> Dataset:
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(counts)]).astype(np.int64)
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(4, 2).repeat(4, 3)
    return Dataset(images, labels, [str(k) for k in range(len(counts))], "test")


FRACS = {"train": 0.6, "val": 0.2, "test": 0.2}


def test_stratified_seeded_and_disjoint() -> None:
    ds = make([50, 30, 20])
    a = stratified_split(ds, FRACS, seed=1, name="t")
    b = stratified_split(ds, FRACS, seed=1, name="t")
    c = stratified_split(ds, FRACS, seed=2, name="t")
    assert [x.ids for x in a.values()] == [x.ids for x in b.values()]
    assert a["test"].ids != c["test"].ids
    ids = [set(x.ids) for x in a.values()]
    assert sum(map(len, ids)) == len(ds) and len(set.union(*ids)) == len(ds)
    # stratified: each split keeps the class proportions (within one item)
    for part, frac in FRACS.items():
        for k, n in enumerate([50, 30, 20]):
            assert abs(a[part].class_counts()[str(k)] - n * frac) <= 1


def test_class_too_small_for_the_splits() -> None:
    with pytest.raises(DataError, match="class '2' has 2 item"):
        stratified_split(make([20, 20, 2]), FRACS, seed=0, name="task data")


def test_split_left_without_a_class() -> None:
    # 3 items of class 1 cannot fill a 5% test split of 60 items stratified → sklearn refuses or
    # the split misses the class; either way the message names the problem.
    with pytest.raises(DataError, match="task data"):
        stratified_split(make([57, 3]), {"train": 0.9, "val": 0.05, "test": 0.05}, 0, "task data")


def test_label_budget_from_train_only_and_test_untouched() -> None:
    ds = make([40, 40, 40])
    parts = stratified_split(ds, FRACS, seed=0, name="t")
    test_before = list(parts["test"].ids)
    small = label_budget(parts["train"], 5, seed=0)
    assert small.class_counts() == {"0": 5, "1": 5, "2": 5}
    assert set(small.ids) <= set(parts["train"].ids)
    assert parts["test"].ids == test_before
    assert label_budget(parts["train"], "all", seed=0) is parts["train"]
    assert label_budget(parts["train"], 5, seed=0).ids == small.ids
