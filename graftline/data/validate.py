"""Checks that run before any training; each failure names the file, row, item or class."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from graftline.data.dataset import Dataset
from graftline.errors import DataError

MAX_LISTED = 20  # problems spelled out in one error; the rest are counted


class Problems:
    """Every problem found in one input, reported together: a person fixing data wants the
    whole list at once, not one problem per run.

    ``add`` records a problem; ``raise_if_any`` raises one :class:`DataError` that names the
    input and lists the first ``MAX_LISTED`` problems, then how many more there are.
    """

    def __init__(self, name: str, limit: int = MAX_LISTED) -> None:
        self.name = name
        self.limit = limit
        self.listed: list[str] = []
        self.count = 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.listed) < self.limit:
            self.listed.append(message)

    def add_all(self, count: int, messages: Iterable[str]) -> None:
        """``count`` problems, of which only as many ``messages`` are formatted as will show."""
        room = max(self.limit - len(self.listed), 0)
        for message, _ in zip(messages, range(min(room, count)), strict=False):
            self.listed.append(message)
        self.count += count

    def __bool__(self) -> bool:
        return self.count > 0

    def raise_if_any(self) -> None:
        if not self.count:
            return
        if self.count == 1:
            raise DataError(f"{self.name}: {self.listed[0]}")
        lines = [f"{self.name}: {self.count} problems"]
        lines += [f"  - {m}" for m in self.listed]
        if self.count > len(self.listed):
            lines.append(f"  ... and {self.count - len(self.listed)} more")
        raise DataError("\n".join(lines))


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
    text = ds.transform.get("kind") == "text"  # texts (N,) or their token ids (N, max_len)
    if not (ds.images.ndim in (1, 2) if text else ds.images.ndim == 4):
        want = "texts (N,) or token ids (N, max_len)" if text else "images (N, C, H, W)"
        raise DataError(f"{name}: expected {want}, got shape {ds.images.shape}")
    if len(ds.images) != len(ds.labels):
        what = "texts" if text else "images"
        raise DataError(f"{name}: {len(ds.images)} {what} but {len(ds.labels)} labels")
    if ds.images.dtype.kind == "f" and not np.isfinite(ds.images).all():
        i = int(np.argwhere(~np.isfinite(ds.images.reshape(len(ds), -1)))[0, 0])
        raise DataError(f"{name}: {ds.ids[i]} contains NaN or Inf")
    if not ds.labelled:  # a corpus without labels: nothing more to check
        return
    bad = (ds.labels < 0) | (ds.labels >= len(ds.classes))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{name}: {ds.ids[i]} has label {ds.labels[i]} outside the class list")
    present = np.unique(ds.labels)
    if len(present) < 2:
        only = ds.classes[int(present[0])]
        raise DataError(f"{name}: only one class ({only!r}); classification needs at least two")


def restrict_classes(ds: Dataset, classes: list[str], name: str) -> Dataset:
    """Map a dataset onto a configured class list; every label outside it is reported."""
    index = {c: i for i, c in enumerate(classes)}
    mapping = np.full(len(ds.classes), -1, dtype=np.int64)
    for i, c in enumerate(ds.classes):
        mapping[i] = index.get(c, -1)
    new = mapping[ds.labels]
    problems = Problems(name)
    for k in np.flatnonzero(mapping < 0):
        items = np.flatnonzero(ds.labels == k)
        if len(items):
            first = ", ".join(ds.ids[i] for i in items[:3])
            problems.add(
                f"label {ds.classes[k]!r} is not in the class list {classes} "
                f"({len(items)} item(s): {first}{', ...' if len(items) > 3 else ''})"
            )
    problems.raise_if_any()
    return Dataset(ds.images, new, list(classes), ds.source, ds.ids, ds.transform, ds.texts)
