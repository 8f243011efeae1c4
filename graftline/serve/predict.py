"""One prediction path for every way the model is used: MLflow pyfunc, HTTP, batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from graftline.train import predict_proba


def predict_proba_pixels(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    """Class probabilities for float pixels ``(N, C, H, W)`` in [0, 255]."""
    return predict_proba(model, np.asarray(pixels, dtype=np.float32))


def predict_frame(
    model: nn.Module, classes: list[str], pixels: np.ndarray, batch_size: int = 1024
) -> pd.DataFrame:
    """Predict float pixels ``(N, C, H, W)`` in [0, 255].

    Returns one row per image: ``class``, ``probability`` and ``p_<class>`` for every class.
    """
    proba = predict_proba(model, np.asarray(pixels, dtype=np.float32), batch_size)
    if not len(proba):
        proba = np.zeros((0, len(classes)), np.float32)
    top = proba.argmax(1)
    out = pd.DataFrame(
        {"class": [classes[i] for i in top], "probability": proba.max(1).astype(np.float64)}
    )
    for i, c in enumerate(classes):
        out[f"p_{c}"] = proba[:, i].astype(np.float64)
    return out
