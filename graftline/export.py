"""Exports of a trained classifier for runtimes that are not graftline: ONNX, and Hugging
Face's format for text models (their backbone, and the classifier where Hugging Face has a
class with the same head).

``model.onnx`` computes the classifier's logits from the tensors its data module feeds the
PyTorch model, so both runtimes share everything before them (decoding, the recorded input
transform, the tokenizer):

- images: ``images``, float32 ``(batch, C, H, W)``, pixels scaled to [0, 1] (the backbone's
  own normalisation, if any, is inside the graph);
- texts: ``input_ids``, int64 ``(batch, sequence)``, and ``attention_mask``, bool, of the
  same shape (right-padded token ids, as the model's tokenizer makes them).

The output is ``logits``, float32 ``(batch, classes)``. Both batch and sequence axes are
dynamic. The graph's metadata says which of the two input conventions it takes.

Exported with ``torch.onnx.export(dynamo=True)`` (the ``torch.export`` path; the TorchScript
exporter is deprecated) and checked against PyTorch's logits before it is used.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graftline.data.modules import DataModule, cut_to_longest
from graftline.hub import quiet_transformers
from graftline.serve.predict import encode_texts

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
# Largest |logit difference| between ONNX Runtime and PyTorch that a deploy accepts: float32
# kernels differ in the order they sum in, which moves the last bits (~1e-6 here).
DEFAULT_TOLERANCE = 1e-4
# The largest batch and sequence the exported graph is declared for (dynamic up to these).
MAX_BATCH = 65536


class ExportError(Exception):
    """An export that fails or disagrees with the PyTorch model."""


class _TokenLogits(nn.Module):
    """A text classifier with its two inputs as plain arguments, the form an ONNX graph
    takes (the classifier itself reads one dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask})


def _batches(module: DataModule, size: int) -> Iterator[dict[str, torch.Tensor] | torch.Tensor]:
    """The model inputs of ``module``'s items in order, as the prediction loop makes them."""
    cpu = torch.device("cpu")
    for batch in module.sequential(size):
        yield module.to_device(batch, cpu).inputs


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's own chatter off the console: a line per optimisation pass (onnxscript,
    onnx_ir at INFO), torchvision's absent operators, a deprecation inside torch.export."""
    names = ("onnxscript", "onnx_ir", "torch.onnx")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def export_onnx(model: nn.Module, module: DataModule, path: Path) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically), traced on a batch of ``module``
    (the items it is checked on next); returns ``path``."""
    import onnx  # noqa: F401  (torch.onnx needs it; a clear ImportError here otherwise)

    model = model.eval().cpu()
    example = next(_batches(module, 2))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if isinstance(example, dict):
        max_len = int(module.transform.get("max_len", 512))
        seq = torch.export.Dim("sequence", min=1, max=max(max_len, 2))
        wrapped: nn.Module = _TokenLogits(model)
        args: tuple[Any, ...] = (example["input_ids"], example["attention_mask"])
        names = ["input_ids", "attention_mask"]
        shapes: Any = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        kind = "text"
    else:
        wrapped, args, names = model, (example.contiguous(),), ["images"]
        shapes = ({0: batch},)
        kind = "images"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                wrapped,
                args,
                dynamo=True,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
                report=False,
            )
        if program is None:  # pragma: no cover - the dynamo path always returns a program
            raise ExportError("torch.onnx.export returned no program")
        program.model.metadata_props["graftline.input"] = kind
        program.save(str(tmp), external_data=False)
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"ONNX export failed: {type(err).__name__}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxClassifier:
    """A ``model.onnx`` run by ONNX Runtime behind the small part of ``nn.Module`` that
    graftline's prediction loop uses (``eval``, ``device``, calling it on a batch's inputs),
    so serving and batch prediction take either runtime unchanged."""

    runtime = "onnx"

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # No busy-waiting between runs: it would take the cores from the server's other
        # threads (and from torch's, which decodes and tokenizes around it).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=_providers())
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.device = torch.device("cpu")  # inputs are handed over as host arrays
        # The checkpoint's naive Bayes + EM, if it has one: the ONNX graph is the network's
        # part, and the loader hands the word model over (graftline.serve.champion).
        self.words: Any = None

    def eval(self) -> OnnxClassifier:
        return self

    def __call__(self, inputs: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, dict):
            feed = {k: inputs[k].cpu().numpy() for k in self.input_names}
        else:
            feed = {self.input_names[0]: np.ascontiguousarray(inputs.cpu().numpy())}
        (logits,) = self.session.run(["logits"], feed)
        return torch.from_numpy(logits)

    def _proba(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        (logits,) = self.session.run(["logits"], feed)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)

    def proba_pixels(self, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Class probabilities of float pixels ``(N, C, H, W)`` in [0, 255], numpy end to
        end (the serving hot path: no torch op between the request and ONNX Runtime)."""
        out = [
            self._proba(
                {self.input_names[0]: np.asarray(pixels[i : i + batch_size], np.float32) / 255.0}
            )
            for i in range(0, len(pixels), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def log_proba_tokens(self, ids: np.ndarray, pad_id: int, batch_size: int = 256) -> np.ndarray:
        """Log class probabilities (log-softmax of the logits, float64) of right-padded token
        rows ``(N, max_len)``, each batch cut to its longest row as the data module cuts it:
        what a word model's log-probabilities are added to."""
        out = []
        for i in range(0, len(ids), batch_size):
            rows = cut_to_longest(np.asarray(ids[i : i + batch_size]), pad_id)
            feed = {"input_ids": rows, "attention_mask": rows != pad_id}
            (logits,) = self.session.run(["logits"], feed)
            z = logits.astype(np.float64)
            z -= z.max(axis=1, keepdims=True)
            out.append(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float64)

    def proba_tokens(self, ids: np.ndarray, pad_id: int, batch_size: int = 256) -> np.ndarray:
        """Class probabilities of right-padded token rows (see :meth:`log_proba_tokens`)."""
        return np.exp(self.log_proba_tokens(ids, pad_id, batch_size)).astype(np.float32)


def logits_difference(model: nn.Module, onnx_model: OnnxClassifier, module: DataModule) -> float:
    """The largest |logit| difference between ``model`` (PyTorch) and ``onnx_model`` over
    every item of ``module``, a batch at a time (batches of several sizes and, for texts,
    lengths: the dynamic axes are exercised)."""
    model = model.eval()
    worst = 0.0
    with torch.no_grad():
        for inputs in _batches(module, 64):
            ref = model(inputs).float()
            got = onnx_model(inputs)
            if got.shape != ref.shape:
                raise ExportError(
                    f"ONNX logits have shape {tuple(got.shape)}, not {tuple(ref.shape)}"
                )
            worst = max(worst, float((got - ref).abs().max()))
    return worst


def export_checked(
    model: nn.Module, module: DataModule, path: Path, tolerance: float = DEFAULT_TOLERANCE
) -> float:
    """Export ``model`` to ``path`` and check ONNX Runtime's logits against PyTorch's on
    every item of ``module``; returns the largest difference. Raises :class:`ExportError`
    (and leaves no file) when the export fails or differs by more than ``tolerance``."""
    export_onnx(model, module, path)
    try:
        diff = logits_difference(model, OnnxClassifier(path), module)
    except Exception as err:
        path.unlink(missing_ok=True)
        if isinstance(err, ExportError):
            raise
        raise ExportError(
            f"ONNX Runtime cannot run the export: {type(err).__name__}: {err}"
        ) from err
    if not np.isfinite(diff) or diff > tolerance:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"ONNX Runtime's logits differ from PyTorch's by {diff:.3g} on the test items "
            f"(tolerance {tolerance:g})"
        )
    log.info(
        "ONNX export %s: %d bytes, max |logit difference| %.3g",
        path.name,
        path.stat().st_size,
        diff,
    )
    return diff


HF_DIR = "huggingface"


def hf_tokenizer(transform: dict[str, Any]) -> Any:
    """A text transform's tokenizer as a ``transformers`` fast tokenizer (the same
    ``tokenizer.json``, its special tokens named, truncating at ``max_len``), which
    ``AutoTokenizer.from_pretrained`` loads back from a saved folder."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from graftline.data.text import BOS, EOS, MASK, PAD, UNK

    # graftline's own tokenizer's specials, or a pretrained checkpoint's (by their names)
    specials = transform.get("special_tokens") or {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "mask_token": MASK,
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(transform["tokenizer"]),
        **specials,
        model_max_length=int(transform["max_len"]),
        padding_side="right",
        truncation_side="right",
    )


def _write_checked(
    folder: Path,
    model: Any,
    transform: dict[str, Any],
    ids: np.ndarray,
    auto: Any,
    difference: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """Save a ``transformers`` model and the transform's tokenizer beside ``folder``, load
    both back as a user would (``auto.from_pretrained``, ``AutoTokenizer``, offline), check
    them on the token rows ``ids`` (the tokenizer's ids of their texts against graftline's;
    ``difference(loaded, input_ids, attention_mask)`` for the model), and only then move the
    folder into place. Returns the largest absolute difference."""
    from transformers import AutoTokenizer

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
            hf_tokenizer(transform).save_pretrained(tmp)
            tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
            texts = tok.batch_decode(ids, skip_special_tokens=True)
            theirs = tok(texts, padding="max_length", truncation=True, return_tensors="np")
            if not np.array_equal(theirs["input_ids"], encode_texts(transform, texts)[0]):
                raise ExportError("the saved tokenizer encodes the texts otherwise than graftline")
            loaded = auto.from_pretrained(tmp, local_files_only=True).eval()
        x = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        mask = x != int(transform["pad_id"])
        with torch.no_grad():
            diff = float(difference(loaded, x, mask).abs().max())
        if not diff <= DEFAULT_TOLERANCE:
            raise ExportError(
                f"the reloaded {type(loaded).__name__} differs from graftline by {diff:.3g}"
            )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return diff


def export_huggingface_backbone(
    backbone: nn.Module, transform: dict[str, Any], folder: Path, ids: np.ndarray
) -> float:
    """Save a text backbone (its ``transformers`` model) and its tokenizer in Hugging
    Face's format in ``folder`` (safetensors), so ``AutoModel.from_pretrained(folder)`` and
    ``AutoTokenizer.from_pretrained(folder)`` load it offline; checked on the token rows
    ``ids`` (``(N, max_len)``, padded): the reloaded model's hidden states against the
    backbone's. Returns their largest difference."""
    from transformers import AutoModel

    def difference(loaded: Any, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ours = backbone.hidden({"input_ids": x, "attention_mask": mask})  # type: ignore[operator]
        theirs = loaded(input_ids=x, attention_mask=mask.long()).last_hidden_state
        return (ours - theirs)[mask]

    inner = backbone.model  # type: ignore[attr-defined]
    return _write_checked(folder, inner, transform, ids, AutoModel, difference)


# Which Hugging Face class a text classifier is, by its backbone and pooling: those whose
# head graftline builds exactly as Hugging Face does. A mean-pooled model has no such class.
HF_CLASSIFIERS = {("llama", "last"): "LlamaForSequenceClassification"}
HF_CLASSIFIERS[("bert", "cls")] = "BertForSequenceClassification"


def hf_classifier_class(model: nn.Module) -> str | None:
    """The ``transformers`` class a text classifier exports as, or None (mean pooling)."""
    backbone = getattr(model, "backbone", None)
    return HF_CLASSIFIERS.get((getattr(backbone, "arch", ""), getattr(backbone, "pool", "")))


def export_huggingface_classifier(
    model: nn.Module, classes: list[str], transform: dict[str, Any], folder: Path, ids: np.ndarray
) -> float:
    """Save a text classifier as the ``transformers`` sequence-classification model it is
    (``LlamaForSequenceClassification`` for a decoder read at its last token,
    ``BertForSequenceClassification`` for an encoder read at ``[CLS]`` through its pooler),
    with ``id2label``/``label2id`` from ``classes`` and its tokenizer, in ``folder``; checked:
    ``AutoModelForSequenceClassification`` reloads it with logits equal to graftline's on the
    token rows ``ids``. Returns the largest logit difference."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    name = hf_classifier_class(model)
    if name is None:
        raise ExportError(
            "a mean-pooled text classifier has no Hugging Face sequence-classification class "
            "(use pool: last for llama, pool: cls for bert)"
        )
    backbone = model.backbone  # type: ignore[attr-defined]
    config = copy.deepcopy(backbone.model.config)
    config.num_labels = len(classes)
    config.id2label = dict(enumerate(classes))
    config.label2id = {c: i for i, c in enumerate(classes)}
    config.pad_token_id = int(transform["pad_id"])
    config.architectures = [name]
    hf = getattr(transformers, name)(config).eval()
    base = hf.model if name.startswith("Llama") else hf.bert
    base.load_state_dict(backbone.model.state_dict())
    (hf.score if name.startswith("Llama") else hf.classifier).load_state_dict(
        model.head.state_dict()  # type: ignore[attr-defined]
    )

    def difference(loaded: Any, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ours = model.eval()({"input_ids": x, "attention_mask": mask})
        return ours - loaded(input_ids=x, attention_mask=mask.long()).logits

    return _write_checked(
        folder, hf, transform, ids, AutoModelForSequenceClassification, difference
    )
