"""Processed datasets on disk: per split ``<split>.npy`` (the uint8 images) and
``<split>.npz`` (labels and item ids), plus ``manifest.json``.

The images are a plain ``.npy`` so that a corpus larger than memory can be memory-mapped and
read batch by batch (``load_split(..., mmap=True)``); everything loads with
``allow_pickle=False``. The manifest says what the data is: counts per class, shapes,
classes, source and a content hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from graftline.data.dataset import Dataset, NumberedIds
from graftline.errors import ArtifactError
from graftline.io import atomic_dir, hash_arrays

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
TEXTS = ".texts.json"


def save_splits(
    dest: Path | str, splits: dict[str, Dataset], extra: dict[str, Any], texts: bool = False
) -> dict:
    """Write all splits and the manifest into ``dest`` atomically; return the manifest.

    The first split's classes are the dataset's (none: unlabelled). A split with other
    classes (the task's labelled probe beside an unlabelled corpus) records its own. With
    ``texts``, the texts behind a text split's token ids are kept too (``<split>.texts.json``:
    the task's, which evaluation, the gate and the predictions read; a corpus keeps its ids
    only).
    """
    first = next(iter(splits.values()))
    # A text transform carries its tokenizer's JSON: it is written beside the splits as
    # tokenizer.json, and the manifest names the file (load_split puts it back).
    tokenizer = first.transform.get("tokenizer")
    transform = dict(first.transform)
    if tokenizer is not None:
        transform["tokenizer"] = TOKENIZER
    manifest: dict[str, Any] = {
        "format": "graftline.dataset/1",
        "classes": first.classes,
        "labelled": first.labelled,
        "shape": list(first.images.shape[1:]),
        "source": first.source,
        "transform": transform,
        "splits": {},
        **extra,
    }
    with atomic_dir(dest) as tmp:
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer)
        for name, ds in splits.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(ds.images), allow_pickle=False)
            # numbered ids (items with no names of their own) are made again on load
            numbered = ds.ids == NumberedIds(manifest["source"], len(ds))
            ids = np.array([], dtype=str) if numbered else np.array(ds.ids)
            np.savez(tmp / f"{name}.npz", labels=ds.labels, ids=ids)
            if texts and ds.texts is not None:
                (tmp / f"{name}{TEXTS}").write_text(json.dumps(ds.texts, ensure_ascii=False))
            manifest["splits"][name] = {
                "count": len(ds),
                "per_class": ds.class_counts(),
                "sha256": hash_arrays(ds.images, ds.labels),
            }
            if ds.classes != first.classes:
                manifest["splits"][name]["classes"] = ds.classes
            if ds.transform != first.transform:
                if ds.transform.get("tokenizer") is not None:
                    raise ValueError(f"split {name!r}: one store holds one tokenizer")
                manifest["splits"][name]["transform"] = ds.transform
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(root: Path | str) -> dict:
    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no processed dataset here (run the preprocess stage)") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: corrupt manifest ({err})") from None


def load_split(root: Path | str, split: str, mmap: bool = False) -> Dataset:
    """Load one split written by :func:`save_splits`; with ``mmap`` its images stay on disk,
    memory-mapped, and are read where they are used (``graftline.train.fit`` reads them a
    batch at a time)."""
    root = Path(root)
    manifest = read_manifest(root)
    path = root / f"{split}.npz"
    if split not in manifest["splits"]:
        raise ArtifactError(f"{root}: no split {split!r} (have {sorted(manifest['splits'])})")
    try:
        with np.load(path, allow_pickle=False) as z:
            labels, ids = z["labels"], z["ids"].tolist()
        images = np.load(root / f"{split}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, KeyError, ValueError) as err:
        raise ArtifactError(f"{path}: cannot read split ({err})") from None
    if len(images) != len(labels):
        raise ArtifactError(f"{root}: split {split!r} has {len(images)} items, {len(labels)} labels")
    meta = manifest["splits"][split]
    transform = meta.get("transform", manifest.get("transform"))
    if isinstance(transform, dict) and transform.get("tokenizer") == TOKENIZER:
        try:
            transform = {**transform, "tokenizer": (root / TOKENIZER).read_text()}
        except OSError as err:
            raise ArtifactError(f"{root / TOKENIZER}: cannot read the tokenizer ({err})") from None
    texts = None
    if (root / f"{split}{TEXTS}").exists():
        try:
            texts = json.loads((root / f"{split}{TEXTS}").read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{root / (split + TEXTS)}: cannot read the texts ({err})") from None
    return Dataset(
        images,
        labels,
        list(meta.get("classes", manifest["classes"])),
        manifest["source"],
        ids,
        transform if isinstance(transform, dict) else {},
        texts,
    )
