"""The in-memory dataset every source produces and every stage consumes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import pandas as pd


class NumberedIds(Sequence[str]):
    """The ids ``source[0]``, ``source[1]``, ... of a set whose items have no names of their
    own, made when asked for: a corpus of millions of images keeps no list of strings."""

    def __init__(self, source: str, n: int) -> None:
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        k = int(i) + self.n if int(i) < 0 else int(i)
        if not 0 <= k < self.n:
            raise IndexError(f"item {i} of {self.n}")
        return f"{self.source}[{k}]"

    def __iter__(self) -> Iterator[str]:
        return (f"{self.source}[{k}]" for k in range(self.n))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NumberedIds):
            return (self.source, self.n) == (other.source, other.n)
        if not isinstance(other, Sequence) or len(other) != self.n:
            return False
        return all(a == b for a, b in zip(self, other, strict=True))  # stops at a difference

    def __repr__(self) -> str:
        return f"NumberedIds({self.source!r}, {self.n})"


@dataclass
class Dataset:
    """Images as uint8 ``(N, C, H, W)`` (or, for text, the texts or their token ids: see
    ``graftline.data.text``), labels as indices into ``classes``.

    An unlabelled corpus has no classes and every label is -1 (:func:`unlabelled`).

    ``ids`` name each item for error messages and predictions (a file path, ``row 12``, or
    ``images.idx[3]``); ``source`` says where the whole set came from; ``transform`` how its
    images were brought to this geometry (``graftline.data.transforms.geometry``).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str
    ids: Sequence[str] = field(default_factory=list)
    transform: dict[str, Any] = field(default_factory=dict)
    # Text only: the texts behind token ids (the task's splits keep them, for the TF-IDF
    # baseline's peers, predictions and the gate's scoring through the served path).
    texts: list[str] | None = None

    def __post_init__(self) -> None:
        if not len(self.ids):
            self.ids = NumberedIds(self.source, len(self.labels))

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
            texts=None if self.texts is None else [self.texts[i] for i in index],
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
                "id": list(self.ids),
                "label": self.labels,
                "class": [self.classes[i] for i in self.labels],
            }
        )


def unlabelled(ds: Dataset) -> Dataset:
    """The same images without their labels."""
    return Dataset(
        ds.images,
        np.full(len(ds.images), -1, dtype=np.int64),
        [],
        ds.source,
        ds.ids,
        ds.transform,
        ds.texts,
    )
