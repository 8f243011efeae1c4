"""The in-memory dataset every source produces and every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class Dataset:
    """Images as uint8 ``(N, C, H, W)``, labels as indices into ``classes``.

    An unlabelled corpus has no classes and every label is -1 (:func:`unlabelled`).

    ``ids`` name each item for error messages and predictions (a file path, ``row 12``, or
    ``images.idx[3]``); ``source`` says where the whole set came from; ``transform`` how its
    images were brought to this geometry (``graftline.data.transforms.geometry``).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str
    ids: list[str] = field(default_factory=list)
    transform: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = [f"{self.source}[{i}]" for i in range(len(self.labels))]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def subset(self, index: np.ndarray) -> Dataset:
        index = np.asarray(index)
        return Dataset(
            images=self.images[index],
            labels=self.labels[index],
            classes=list(self.classes),
            source=self.source,
            ids=[self.ids[i] for i in index],
            transform=dict(self.transform),
        )

    def class_counts(self) -> dict[str, int]:
        if not self.labelled:
            return {}
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def table(self) -> pd.DataFrame:
        """One row per item: id, label index and class name."""
        return pd.DataFrame(
            {
                "id": self.ids,
                "label": self.labels,
                "class": [self.classes[i] for i in self.labels],
            }
        )


def unlabelled(ds: Dataset) -> Dataset:
    """The same images without their labels."""
    return Dataset(
        ds.images, np.full(len(ds.images), -1, dtype=np.int64), [], ds.source, ds.ids, ds.transform
    )
