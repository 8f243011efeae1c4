"""Pretrained Hugging Face checkpoints in a local folder: checked, hashed and loaded offline.

A checkpoint is what ``save_pretrained`` writes: ``config.json``, the weights
(``model.safetensors``, or shards with ``model.safetensors.index.json``) and, for text, the
tokenizer (``tokenizer.json`` beside ``tokenizer_config.json`` and
``special_tokens_map.json``). graftline reads it with ``local_files_only=True`` and
``trust_remote_code=False`` and refuses, before anything is loaded:

- a checkpoint whose code lives with it (``auto_map`` in a config, ``*.py`` files): it would
  need ``trust_remote_code``, and graftline never runs a checkpoint's code;
- pickled weights (``pytorch_model.bin``) that do not load with ``torch.load(...,
  weights_only=True)``: unpickling them could run anything;
- a model type whose layout graftline does not know (its pooling, LoRA targets, layer-wise
  LR decay and exports are written for ``llama`` and ``bert``: Llama-style decoders, BERT-style
  encoders);
- a file that is a link to outside the folder.

The folder's hash (:func:`folder_sha256`) names the checkpoint in the model card and the
lineage tags; DVC tracks the folder itself (``checkpoints/`` is a dependency of the
preprocess and pretrain stages).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftline.errors import ArtifactError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger(__name__)

# model_type -> what it is. The head reads the last token of a decoder, [CLS] of an encoder.
SUPPORTED = {"llama": "decoder", "bert": "encoder"}
DEFAULT_POOL = {"decoder": "last", "encoder": "cls"}
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CONFIGS_WITH_CODE = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class HubCheckpoint:
    """A checked checkpoint folder."""

    path: Path
    model_type: str
    config: dict[str, Any] = field(repr=False)
    sha256: str
    weights: str  # "safetensors" or "pickle (weights_only)"

    @property
    def kind(self) -> str:
        """``decoder`` or ``encoder``."""
        return SUPPORTED[self.model_type]

    def record(self) -> dict[str, Any]:
        """What checkpoints, cards and lineage tags say of it."""
        return {
            "kind": "huggingface",
            "path": self.path.as_posix(),
            "sha256": self.sha256,
            "model_type": self.model_type,
            "architectures": list(self.config.get("architectures") or []),
            "weights": self.weights,
        }


def _files(folder: Path) -> list[Path]:
    """Every file of ``folder`` (recursively, hidden ones aside), sorted; a link that leads
    outside it is refused."""
    root = folder.resolve()
    out = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if not f.resolve().is_relative_to(root):
            raise ArtifactError(f"{folder}: {rel} is a link to outside the checkpoint folder")
        if f.is_file():
            out.append(f)
    return out


def folder_sha256(folder: Path | str) -> str:
    """One hash of a folder's files: their relative paths and contents."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for f in _files(folder):
        digest.update(f.relative_to(folder).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(
            f"{path}: not found (is the folder a save_pretrained checkpoint?)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def _refuse_remote_code(folder: Path, files: list[Path]) -> None:
    code = [f.relative_to(folder).as_posix() for f in files if f.suffix == ".py"]
    for name in CONFIGS_WITH_CODE:
        path = folder / name
        auto_map = _read_json(path).get("auto_map") if path.exists() else None
        if auto_map:
            code.insert(0, f"{name}: auto_map {sorted(auto_map)}")
    if code:
        raise ArtifactError(
            f"{folder}: this checkpoint brings code of its own ({', '.join(code[:3])}), which "
            "loading would need trust_remote_code for; graftline never runs a checkpoint's "
            "code. Use a checkpoint of a model type transformers implements (llama, bert)"
        )


def _check_weights(folder: Path) -> str:
    if any((folder / name).exists() for name in SAFE_WEIGHTS):
        return "safetensors"
    pickled = [folder / n for n in PICKLED_WEIGHTS if (folder / n).exists()]
    if not pickled:
        raise ArtifactError(
            f"{folder}: no weights (model.safetensors, or shards with model.safetensors.index.json)"
        )
    import torch

    shards = [pickled[0]]
    if pickled[0].name.endswith(".index.json"):
        names = set(_read_json(pickled[0]).get("weight_map", {}).values())
        shards = [folder / n for n in sorted(names)]
    for shard in shards:
        try:
            torch.load(shard, map_location="cpu", weights_only=True)
        except Exception as err:  # an unsafe pickle, or a corrupt file
            raise ArtifactError(
                f"{shard}: pickled weights that do not load with torch.load(weights_only=True) "
                f"({type(err).__name__}); unpickling them could run code, so they are refused. "
                "Save the checkpoint with safe_serialization=True (model.safetensors)"
            ) from None
    return "pickle (weights_only)"


def inspect_checkpoint(path: Path | str, *, tokenizer: bool = True) -> HubCheckpoint:
    """Check a checkpoint folder without running anything of it; returns what it is.

    Raises:
        ArtifactError: naming the folder and what is wrong with it.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such checkpoint folder")
    files = _files(folder)
    _refuse_remote_code(folder, files)
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ArtifactError(
            f"{folder / 'config.json'}: model_type {model_type!r}; graftline fine-tunes "
            f"checkpoints of model type {' or '.join(SUPPORTED)} (Llama-style decoders, "
            "BERT-style encoders)"
        )
    if tokenizer and not (folder / "tokenizer.json").exists():
        raise ArtifactError(
            f"{folder}: no tokenizer.json (a fast tokenizer, saved with the model by "
            "tokenizer.save_pretrained); a text model needs the tokenizer it was trained with"
        )
    weights = _check_weights(folder)
    return HubCheckpoint(folder, model_type, config, folder_sha256(folder), weights)


def load_tokenizer(path: Path | str) -> Any:
    """The checkpoint's fast tokenizer (``transformers``), offline, no code of its own."""
    from transformers import AutoTokenizer

    folder = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a bad folder
        raise ArtifactError(f"{folder}: cannot load its tokenizer ({err})") from None
    if not getattr(tok, "is_fast", False):
        raise ArtifactError(f"{folder}: its tokenizer is not a fast one (no tokenizer.json)")
    return tok


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars and no load reports from ``transformers`` (graftline logs what
    matters in one line): a stage's console stays readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def load_base_model(ckpt: HubCheckpoint, pool: str) -> Any:
    """The checkpoint's ``transformers`` base model (``LlamaModel``, ``BertModel``) with
    its pretrained weights, in float32. Weights the checkpoint lacks (BERT's pooler when it
    was saved by a masked-LM) start from the config's random initialisation."""
    import torch
    from transformers import AutoModel

    kwargs: dict[str, Any] = (
        {"add_pooling_layer": pool == "cls"} if ckpt.model_type == "bert" else {}
    )
    try:
        with quiet_transformers():
            model, info = AutoModel.from_pretrained(
                ckpt.path,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=ckpt.weights == "safetensors",
                dtype=torch.float32,
                output_loading_info=True,
                **kwargs,
            )
    except Exception as err:  # transformers raises many types for a bad folder
        raise ArtifactError(f"{ckpt.path}: cannot load the model ({err})") from None
    log.info(
        "%s: %s loaded; weights it lacks (initialised): %s; weights not used (another head): %s",
        ckpt.path,
        type(model).__name__,
        sorted(info.get("missing_keys", [])) or "none",
        len(info.get("unexpected_keys", [])),
    )
    return model


def config_dict(model: Any) -> dict[str, Any]:
    """A model's config as plain JSON values (what a graftline checkpoint can hold)."""
    return json.loads(model.config.to_json_string(use_diff=False))
