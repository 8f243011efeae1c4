"""One prediction path for every way the model is used: MLflow pyfunc, HTTP, batch.

An image model takes float pixels ``(N, C, H, W)`` in [0, 255]; a text model takes texts,
tokenized here with the tokenizer its checkpoint carries (its transform), truncated at its
``max_len`` as its training texts were.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from graftline.train import predict_proba


def is_text_model(transform: dict[str, Any]) -> bool:
    """Whether a model with this input transform reads texts."""
    return transform.get("kind") == "text"


def encode_texts(transform: dict[str, Any], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(N, max_len)`` of ``texts`` under a text model's transform, and which of
    them were truncated."""
    from graftline.data.text import cached_tokenizer, encode

    tok = cached_tokenizer(transform["tokenizer"])
    return encode(tok, texts, int(transform["max_len"]), int(transform["pad_id"]))


def text_proba(
    model: nn.Module, transform: dict[str, Any], texts: list[str], batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities of ``texts``, and which were truncated at ``max_len``."""
    from graftline.data.modules import Part, TokenData

    ids, cut = encode_texts(transform, texts)
    part = Part(ids, np.full(len(ids), -1, np.int64))
    data = TokenData([part], [], transform, int(transform["pad_id"]))
    return predict_proba(model, data, batch_size), cut


def predict_proba_pixels(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    """Class probabilities for float pixels ``(N, C, H, W)`` in [0, 255]."""
    return predict_proba(model, np.asarray(pixels, dtype=np.float32))


def predict_frame(
    model: nn.Module,
    classes: list[str],
    inputs: np.ndarray | list[str],
    batch_size: int = 1024,
    transform: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Predict float pixels ``(N, C, H, W)`` in [0, 255], or texts for a text model.

    Returns one row per item: ``class``, ``probability`` and ``p_<class>`` for every class;
    for texts also ``truncated`` (the text had more than ``max_len`` tokens).
    """
    cut = None
    if transform is not None and is_text_model(transform):
        proba, cut = text_proba(model, transform, [str(t) for t in inputs], batch_size)
    else:
        proba = predict_proba(model, np.asarray(inputs, dtype=np.float32), batch_size)
    if not len(proba):
        proba = np.zeros((0, len(classes)), np.float32)
    top = proba.argmax(1)
    out = pd.DataFrame(
        {"class": [classes[i] for i in top], "probability": proba.max(1).astype(np.float64)}
    )
    for i, c in enumerate(classes):
        out[f"p_{c}"] = proba[:, i].astype(np.float64)
    if cut is not None:
        out["truncated"] = cut
    return out
