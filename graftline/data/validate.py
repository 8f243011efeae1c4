"""Checks that run before any training; each failure names the file, row, item or class."""

from __future__ import annotations

import numpy as np

from graftline.data.dataset import Dataset
from graftline.errors import DataError


def validate(ds: Dataset, name: str) -> None:
    """Reject a dataset no stage should train or evaluate on.

    Args:
        ds: the loaded dataset.
        name: what to call it in messages (``"task data (csv:digits.csv)"``).
    Raises:
        DataError: empty, inconsistent shapes, non-finite values, out-of-range labels or a
            single class.
    """
    if len(ds) == 0 or ds.images.size == 0:
        raise DataError(f"{name}: the dataset is empty")
    if ds.images.ndim != 4:
        raise DataError(f"{name}: images must be (N, C, H, W), got shape {ds.images.shape}")
    if len(ds.images) != len(ds.labels):
        raise DataError(f"{name}: {len(ds.images)} images but {len(ds.labels)} labels")
    if ds.images.dtype.kind == "f" and not np.isfinite(ds.images).all():
        i = int(np.argwhere(~np.isfinite(ds.images.reshape(len(ds), -1)))[0, 0])
        raise DataError(f"{name}: {ds.ids[i]} contains NaN or Inf")
    bad = (ds.labels < 0) | (ds.labels >= len(ds.classes))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{name}: {ds.ids[i]} has label {ds.labels[i]} outside the class list")
    present = np.unique(ds.labels)
    if len(present) < 2:
        only = ds.classes[int(present[0])]
        raise DataError(f"{name}: only one class ({only!r}); classification needs at least two")


def restrict_classes(ds: Dataset, classes: list[str], name: str) -> Dataset:
    """Map a dataset onto a configured class list; a label outside it is an error."""
    index = {c: i for i, c in enumerate(classes)}
    mapping = np.full(len(ds.classes), -1, dtype=np.int64)
    for i, c in enumerate(ds.classes):
        mapping[i] = index.get(c, -1)
    new = mapping[ds.labels]
    if (new < 0).any():
        i = int(np.argmax(new < 0))
        raise DataError(
            f"{name}: {ds.ids[i]} has label {ds.classes[ds.labels[i]]!r}, "
            f"which is not in the class list {classes}"
        )
    return Dataset(ds.images, new, list(classes), ds.source, ds.ids)
