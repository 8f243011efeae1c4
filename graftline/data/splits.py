"""Stratified, seeded splits and the label budget."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from graftline.data.dataset import Dataset
from graftline.data.validate import Problems
from graftline.errors import DataError


def stratified_split(
    ds: Dataset, fractions: dict[str, float], seed: int, name: str
) -> dict[str, Dataset]:
    """Split into named parts; the first key takes what the other fractions leave.

    Every part must hold every class: a split without some class cannot be trained or scored
    fairly, so that is an error that names the class. A dataset without labels is split at
    random (seeded).
    """
    names = list(fractions)
    stratify = ds.labelled
    counts = ds.class_counts()
    need = len(names)
    problems = Problems(name)
    for c, n in counts.items():
        if 0 < n < need:
            problems.add(
                f"class {c!r} has {n} item(s); each of the {need} splits "
                f"({', '.join(names)}) needs at least one"
            )
    problems.raise_if_any()
    index = np.arange(len(ds))
    rest, parts = index, {}
    remaining = 1.0
    for part in reversed(names[1:]):
        frac = fractions[part] / remaining
        try:
            rest, taken = train_test_split(
                rest,
                test_size=frac,
                random_state=seed,
                stratify=ds.labels[rest] if stratify else None,
            )
        except ValueError as err:
            raise DataError(f"{name}: cannot make the {part!r} split: {err}") from None
        parts[part] = np.sort(taken)
        remaining -= fractions[part]
    parts[names[0]] = np.sort(rest)
    out = {p: ds.subset(parts[p]) for p in names}
    if not stratify:
        return out
    present_all = set(np.unique(ds.labels).tolist())
    for p, sub in out.items():
        missing = present_all - set(np.unique(sub.labels).tolist())
        if missing:
            miss = ", ".join(repr(ds.classes[m]) for m in sorted(missing))
            raise DataError(f"{name}: the {p!r} split has no items of class {miss}")
    return out


def label_budget(ds: Dataset, per_class: int | str, seed: int) -> Dataset:
    """Keep at most ``per_class`` labelled items of each class (seeded), or all of them."""
    if per_class == "all":
        return ds
    rng = np.random.default_rng(seed)
    keep = []
    for k in range(len(ds.classes)):
        members = np.flatnonzero(ds.labels == k)
        if len(members) > int(per_class):
            members = rng.choice(members, size=int(per_class), replace=False)
        keep.append(members)
    return ds.subset(np.sort(np.concatenate(keep)))
