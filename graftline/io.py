"""Atomic writes and content hashes.

Every artifact is written to a temporary file beside its destination and moved into place
with ``os.replace``, so a crash never leaves a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from graftline.errors import ArtifactError


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` if the block succeeds.

    Raises:
        ArtifactError: the disk filled up (or a quota was reached) while writing; ``dest``
            keeps its previous content and the temporary file is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = dest
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.replace(tmp_path, dest)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ArtifactError(
            f"{dest}: no space left on the device while writing it "
            f"({'the previous version is intact' if dest.exists() else 'nothing was written'})"
        ) from err
    finally:
        if tmp_path != dest:
            tmp_path.unlink(missing_ok=True)


def write_json(dest: Path | str, data: Any) -> None:
    """Write JSON atomically (sorted keys, trailing newline: stable diffs)."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; swap it in for ``dest`` on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def hash_arrays(*arrays: np.ndarray, chunk_bytes: int = 64 << 20) -> str:
    """sha256 over the dtype, shape and bytes of each array, read in chunks: a memory-mapped
    array larger than memory is hashed without being loaded."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        if a.ndim == 0 or len(a) == 0:
            h.update(np.ascontiguousarray(a).tobytes())
            continue
        rows = max(1, chunk_bytes // max(1, a[0].nbytes))
        for i in range(0, len(a), rows):
            h.update(np.ascontiguousarray(a[i : i + rows]).tobytes())
            release(a)  # a chunk's pages leave this process before the next is read
    return h.hexdigest()


def file_sha256(path: Path | str, chunk_bytes: int = 16 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def release(a: np.ndarray) -> None:
    """Let the kernel drop the pages of a memory-mapped array from this process (they stay in
    the page cache): reading a corpus larger than memory must not grow the resident set.
    Nothing for an in-memory array."""
    mm = getattr(a, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)


def _mapped_at(a: np.memmap) -> int | None:
    """Where the data of memory-mapped ``a`` (the array or a view of it) starts in its file,
    or None when that cannot be told."""
    mm = getattr(a, "_mmap", None)
    if mm is None or not getattr(a, "filename", None):
        return None
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    mapped_from = a.offset - a.offset % mmap.ALLOCATIONGRANULARITY  # how numpy maps it
    return a.ctypes.data - base + mapped_from


def read_rows(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``a[index]`` as a new contiguous array; for a memory-mapped ``a``, read with ``pread``.

    Indexing the mapping instead would map the pages around every row into this process: a
    page fault maps the whole folio that the page cache holds (ext4 and XFS keep large ones
    on recent kernels), so a batch of 512 random rows of a 1 GB corpus mapped ~400 MB, and
    a corpus larger than memory grew the resident set until the kernel reclaimed it. Read
    rows land only in the page cache, which the kernel sizes to the memory it has.
    """
    index = np.asarray(index, dtype=np.int64)
    start = _mapped_at(a) if isinstance(a, np.memmap) and a.flags.c_contiguous else None
    if start is None or a.ndim == 0:
        return np.ascontiguousarray(a[index])
    if len(index) and (index.min() < -len(a) or index.max() >= len(a)):
        raise IndexError(f"row index out of range for {len(a)} rows")
    index = np.where(index < 0, index + len(a), index)
    out = np.empty((len(index), *a.shape[1:]), dtype=a.dtype)
    row = out[0].nbytes if len(out) else 0
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(a.filename, os.O_RDONLY)  # per call: a file replaced meanwhile is read anew
    try:
        for k, i in enumerate(index.tolist()):
            got = os.preadv(fd, [view[k * row : (k + 1) * row]], start + i * row)
            if got != row:
                raise ArtifactError(f"{a.filename}: short read at row {i} (file truncated?)")
    finally:
        os.close(fd)
    return out
