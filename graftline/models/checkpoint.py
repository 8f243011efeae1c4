"""Self-describing checkpoints: weights as a state_dict plus everything needed to rebuild.

A checkpoint is a plain dict of tensors, strings and numbers, so it loads with
``torch.load(..., weights_only=True)``: no pickled code runs on load.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from graftline.data.transforms import legacy_geometry
from graftline.errors import ArtifactError
from graftline.io import atomic_path
from graftline.models.classifier import Classifier, build_classifier, input_dims
from graftline.nb_em import NaiveBayesEM

FORMAT = "graftline.checkpoint/1"


def save_checkpoint(
    path: Path | str,
    model: Classifier,
    *,
    model_config: dict[str, Any],
    classes: list[str],
    input_shape: tuple[int, ...],
    transform: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` atomically with its architecture config, classes, input shape and the
    transform that brought its training items to that shape (``transforms.geometry``; for
    text, the tokenizer: ``graftline.data.text``), and its word model if it has one (its
    arrays and word list: ``graftline.nb_em``)."""
    words = getattr(model, "words", None)
    ckpt = {
        "format": FORMAT,
        "model_config": dict(model_config),
        "classes": list(classes),
        "input_shape": list(input_shape),
        "transform": dict(transform or legacy_geometry(input_shape)),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        **({"nb_em": words.state()} if words is not None else {}),
        **(extra or {}),
    }
    # Through a buffer: torch.save names the zip's root folder after the file, and the
    # temporary file's random name would make identical weights hash differently in DVC.
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: checkpoint not found") from None
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise ArtifactError(f"{path}: cannot load checkpoint safely ({err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a graftline checkpoint (format {FORMAT} expected)")
    return ckpt


def load_checkpoint(path: Path | str) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model a checkpoint describes; returns ``(model in eval mode, checkpoint)``."""
    ckpt = read_checkpoint(path)
    c, h = input_dims(ckpt["input_shape"])  # (C, H, W) images; (max_len,) token ids
    try:
        model = build_classifier(ckpt["model_config"], c, h, len(ckpt["classes"]))
    except ValueError as err:
        raise ArtifactError(f"{path}: cannot rebuild the stored architecture ({err})") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ArtifactError(f"{path}: weights do not match the stored architecture ({err})") from None
    if "nb_em" in ckpt:
        try:
            model.words = NaiveBayesEM.from_state(ckpt["nb_em"])
        except (ValueError, KeyError, AttributeError) as err:
            raise ArtifactError(f"{path}: unusable naive Bayes + EM word model ({err})") from None
    model.eval()
    return model, ckpt


def input_transform(ckpt: dict[str, Any]) -> dict[str, Any]:
    """How images become this model's input; checkpoints from before it was recorded were
    trained on resized images."""
    transform = ckpt.get("transform")
    return dict(transform) if transform else legacy_geometry(ckpt["input_shape"])
