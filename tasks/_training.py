"""Pieces the two training stages share: run fingerprints and learning-curve tables."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from graftline.io import write_text


def fingerprint(*parts: Any) -> str:
    """A stable id of a training run (its params and input hashes), for safe resume."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch learning curve as CSV (a DVC plot); wall-clock columns are left out so the
    file, and so ``dvc.lock``, is the same on every re-run."""
    df = pd.DataFrame(history).drop(columns=["seconds"], errors="ignore")
    write_text(path, df.to_csv(index=False, float_format="%.6g"))
