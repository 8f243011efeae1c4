"""Batch prediction: a folder of images or a CSV of pixels in (texts: a .txt, CSV, JSON Lines
or Parquet file), a CSV of predictions out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from graftline.data.sources import IMAGE_SUFFIXES
from graftline.data.transforms import apply_transform, image_array, legacy_geometry
from graftline.errors import DataError
from graftline.io import write_text
from graftline.serve.champion import LoadedModel


def prepare_image(img: Image.Image, transform: dict[str, Any]) -> np.ndarray:
    """Any PIL image to the model's input: float ``(C, H, W)`` in [0, 255], brought there by
    ``transform``, the one the model's training data got (``graftline.data.transforms``):
    the same channels, polarity rule and fit as the files it was trained on, nothing more."""
    arr = image_array(img, int(transform["channels"]))
    return apply_transform(arr[None], transform)[0].astype(np.float32)


def read_inputs(
    path: Path, shape: tuple[int, int, int], transform: dict | None = None
) -> tuple[list[str], np.ndarray]:
    """Items and their pixels from a folder of images (brought to the model's input by
    ``transform``, default a plain resize) or a CSV of pixel columns (taken as they are: rows
    of the model's input, as the processed data holds them)."""
    c, h, w = shape
    transform = transform or legacy_geometry(shape)
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"{path}: no images (looked for {sorted(IMAGE_SUFFIXES)})")
        pixels = np.empty((len(files), c, h, w), dtype=np.float32)
        for i, f in enumerate(tqdm(files, desc="reading", unit="image", leave=False)):
            try:
                with Image.open(f) as img:
                    img.load()
                    pixels[i] = prepare_image(img, transform)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                raise DataError(f"{f}: unreadable or truncated image ({err})") from None
        return [str(f.relative_to(path)) for f in files], pixels
    if path.suffix.lower() == ".csv":
        try:
            df = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise DataError(f"{path}: cannot read CSV ({err})") from None
        ids = df.pop("id").astype(str).tolist() if "id" in df.columns else None
        df = df.drop(columns=[col for col in ("label",) if col in df.columns])
        if df.shape[1] != c * h * w:
            raise DataError(f"{path}: {df.shape[1]} pixel columns, the model takes {c * h * w}")
        values = df.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
        bad = ~np.isfinite(values) | (values < 0) | (values > 255)
        if bad.any():
            r = int(np.argwhere(bad)[0, 0])
            raise DataError(f"{path}: row {r + 2} has a missing, non-numeric or out-of-range pixel")
        ids = ids or [f"row {i + 2}" for i in range(len(df))]
        return ids, values.reshape(-1, c, h, w)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    raise DataError(f"{path}: expected a folder of images or a .csv file")


TEXT_FILES = {".txt", ".csv", ".jsonl", ".parquet"}


def read_texts(path: Path, text_column: str = "text") -> tuple[list[str], list[str]]:
    """Items and their texts for a text model: a ``.txt`` file (one text per line; blank
    lines skipped) or a CSV, JSON Lines or Parquet table's ``text_column``, checked as a text
    source is (every bad row named)."""
    from graftline.config import TextTableSource
    from graftline.data.text import load_text_table

    suffix = path.suffix.lower()
    if suffix not in TEXT_FILES:
        raise DataError(
            f"{path}: a text model reads a .txt (a text per line), .csv, .jsonl or .parquet file"
        )
    if suffix == ".txt":
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise DataError(f"{path}: line {line} is not valid UTF-8") from None
        kept = [(f"line {i}", t) for i, t in enumerate(lines, start=1) if t.strip()]
        if not kept:
            raise DataError(f"{path}: no text in the file")
        return [k for k, _ in kept], [t for _, t in kept]
    src = TextTableSource(
        kind="text_table", path=str(path), text_column=text_column, labels="ignore"
    )
    ds = load_text_table(src)
    return list(ds.ids), [str(t) for t in ds.images]


def predict_batch(
    loaded: LoadedModel,
    ids: list[str],
    inputs: np.ndarray | list[str],
    out: Path,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Predict in batches with a progress bar; write ``file,class,probability,model_version``
    (texts: ``id,class,probability,truncated,model_version``)."""
    parts = []
    for i in tqdm(
        range(0, len(inputs), batch_size), desc=f"predicting (v{loaded.version})", unit="batch"
    ):
        parts.append(loaded.predict(inputs[i : i + batch_size]))
    frame = pd.concat(parts, ignore_index=True)
    result = pd.DataFrame(
        {
            "id" if loaded.text else "file": ids,
            "class": frame["class"],
            "probability": frame["probability"].round(6),
        }
    )
    if loaded.text:
        result["truncated"] = frame["truncated"]
    result["model_version"] = loaded.version
    write_text(out, result.to_csv(index=False))
    return result


def summary(result: pd.DataFrame) -> dict[str, Any]:
    return {"items": len(result), "classes": result["class"].value_counts().to_dict()}
