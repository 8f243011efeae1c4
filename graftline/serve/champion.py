"""The champion model, loaded from the MLflow registry and followed as the alias moves.

A background thread re-reads ``models:/<name>@champion`` every few seconds; when the alias
points at another version it loads that version *beside* the current one and then swaps
one reference. A request takes the reference once at its start, so a request in flight
finishes on the model it began with and no request fails during a switch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from graftline.models.checkpoint import input_transform, load_checkpoint
from graftline.nb_em import combine, texts_of_ids
from graftline.registry import CHAMPION
from graftline.serve.predict import (
    encode_texts,
    is_text_model,
    predict_frame,
    predict_proba_pixels,
    text_proba,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    version: str
    model: nn.Module  # or graftline.export.OnnxClassifier (runtime onnx)
    classes: list[str]
    input_shape: tuple[int, ...]  # (C, H, W) images; (max_len,) for a text model
    info: dict[str, Any] = field(default_factory=dict)
    checkpoint_file: tuple[str, int] = ("", 0)  # path inside the version's artifacts, size
    # How an image becomes this model's input (what its training data got), or a text
    # (its tokenizer and max_len).
    transform: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> bool:
        """Whether this model reads texts."""
        return is_text_model(self.transform)

    def predict(self, inputs: np.ndarray | list[str]) -> pd.DataFrame:
        return predict_frame(self.model, self.classes, inputs, transform=self.transform)

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        if hasattr(self.model, "proba_pixels"):  # ONNX Runtime: numpy end to end
            return self.model.proba_pixels(pixels)
        return predict_proba_pixels(self.model, pixels)

    def predict_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities of ``texts`` and which were truncated at the model's ``max_len``."""
        if hasattr(self.model, "proba_tokens"):  # ONNX Runtime: the network's part
            ids, cut = encode_texts(self.transform, texts)
            pad_id = int(self.transform["pad_id"])
            words = getattr(self.model, "words", None)
            if words is None or not len(ids):
                return self.model.proba_tokens(ids, pad_id), cut
            # as graftline.train.predict_proba does: log-softmax + the word model, normalised
            log_p = self.model.log_proba_tokens(ids, pad_id)
            proba = combine(log_p, words, texts_of_ids(ids, self.transform))
            return proba.astype(np.float32), cut
        return text_proba(self.model, self.transform, texts)


RUNTIMES = ("torch", "onnx")


def load_version(client: Any, name: str, version: str, runtime: str = "torch") -> LoadedModel:
    """Download one registered version and rebuild it (weights only, no pickle): its
    checkpoint on PyTorch, or its ``model.onnx`` on ONNX Runtime (``runtime="onnx"``); the
    checkpoint gives the classes and the input transform either way."""
    import mlflow

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    mv = client.get_model_version(name, version)
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    found = sorted(root.rglob("model.pt"))
    if not found:
        raise FileNotFoundError(f"models:/{name}/{version} has no checkpoint artifact")
    model: Any
    model, ckpt = load_checkpoint(found[0])
    if runtime == "onnx":
        from graftline.export import ONNX_FILE, OnnxClassifier

        exported = sorted(root.rglob(ONNX_FILE))
        if not exported:
            raise FileNotFoundError(
                f"models:/{name}/{version} has no {ONNX_FILE} (registered with "
                "deploy.export.onnx off, or before graftline exported ONNX); serve it with "
                "--runtime torch"
            )
        import torch

        words = model.words  # the checkpoint's word model multiplies the ONNX network's
        model = OnnxClassifier(exported[0], threads=torch.get_num_threads())
        model.words = words
    checkpoint_file = (found[0].relative_to(root).as_posix(), found[0].stat().st_size)
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            metrics = dict(client.get_run(mv.run_id).data.metrics)
        except Exception:  # a run deleted from tracking must not stop serving
            metrics = {}
    info = {
        "name": name,
        "version": str(version),
        "run_id": mv.run_id,
        "source": mv.source,
        "classes": list(ckpt["classes"]),
        "input_shape": list(ckpt["input_shape"]),
        "transform": input_transform(ckpt),
        "metrics": metrics,
        "tags": dict(mv.tags),
        "aliases": list(getattr(mv, "aliases", []) or []),
        "runtime": runtime,
    }
    return LoadedModel(
        str(version),
        model,
        list(ckpt["classes"]),
        tuple(ckpt["input_shape"]),
        info,
        checkpoint_file,
        input_transform(ckpt),
    )


def _artifact_problem(name: str, loaded: LoadedModel) -> str:
    """What is wrong with the registry's copy of the served version's checkpoint, or ""."""
    import mlflow

    path, size = loaded.checkpoint_file
    folder = path.rpartition("/")[0]
    uri = f"models:/{name}/{loaded.version}" + (f"/{folder}" if folder else "")
    try:
        listed = {
            f.path.rpartition("/")[2]: f.file_size for f in mlflow.artifacts.list_artifacts(uri)
        }
    except Exception as err:  # a store that cannot list counts as a store that lost it
        return f"cannot read the registry's copy of v{loaded.version} ({str(err)[:300]})"
    name_only = path.rpartition("/")[2]
    if name_only not in listed:
        return f"the registry's checkpoint of v{loaded.version} ({path}) is gone"
    if listed[name_only] not in (None, size):
        return (
            f"the registry's checkpoint of v{loaded.version} ({path}) changed size "
            f"({size} -> {listed[name_only]} bytes): corrupted or replaced"
        )
    return ""


class ChampionFollower:
    """Holds the current champion and follows the alias in a background thread."""

    def __init__(
        self, name: str, client: Any, poll_seconds: float = 2.0, runtime: str = "torch"
    ) -> None:
        self.name = name
        self.client = client
        self.runtime = runtime
        self.poll_seconds = poll_seconds
        self.current: LoadedModel | None = None
        self.reason = "not loaded yet"
        # What is wrong while a model is served anyway (registry unreachable, its artifact
        # gone or changed); empty when all is well.
        self.warning = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Load the champion if the alias moved; returns True when the model changed."""
        from mlflow.exceptions import MlflowException

        with self._lock:
            try:
                mv = self.client.get_model_version_by_alias(self.name, CHAMPION)
            except MlflowException as err:
                if self.current is None:
                    self.reason = f"no champion for model {self.name!r} in the registry"
                else:
                    self._warn(f"the registry does not answer ({str(err)[:300]})")
                log.debug("champion lookup failed: %s", err)
                return False
            version = str(mv.version)
            if self.current is not None and self.current.version == version:
                self._warn(_artifact_problem(self.name, self.current))
                return False
            loaded = load_version(self.client, self.name, version, self.runtime)
            previous = self.current.version if self.current else None
            self.current = loaded  # one reference swap: in-flight requests keep the old one
            self.reason = ""
            self.warning = ""
            log.info("serving %s v%s (was %s)", self.name, version, previous or "none")
            return True

    def _warn(self, problem: str) -> None:
        if problem and self.current is not None:
            problem = f"{problem}; still serving v{self.current.version} as loaded"
            if problem != self.warning:
                log.warning("%s", problem)
        self.warning = problem

    def start(self) -> None:
        try:
            self.refresh()
        except Exception as err:  # serve /health and say why in /ready, rather than crash
            self.reason = f"cannot load the champion: {err}"
            log.exception("initial champion load failed")
        self._thread = threading.Thread(target=self._loop, name="champion-follower", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception as err:  # keep serving the current model; try again next tick
                self._warn(f"cannot load the champion ({str(err)[:300]})")
                log.exception(
                    "champion refresh failed; still serving v%s",
                    self.current.version if self.current else "-",
                )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_seconds + 5)

    def wait_ready(self, seconds: float) -> bool:
        deadline = time.time() + seconds
        while self.current is None and time.time() < deadline:
            time.sleep(0.1)
        return self.current is not None
