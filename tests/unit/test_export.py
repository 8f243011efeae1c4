"""ONNX export of every architecture: ONNX Runtime's logits equal PyTorch's on batches and
sequences of other sizes than the one traced, and an export that disagrees leaves no file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graftline.data.modules import ImageData, Part, TokenData
from graftline.export import ExportError, OnnxClassifier, export_checked, logits_difference
from graftline.models import build_classifier
from graftline.serve.predict import predict_frame
from graftline.train import predict_proba

IMAGE_MODELS = {
    "cnn": {"arch": "cnn", "channels": [4, 8], "hidden": 16, "dropout": 0.0, "batch_norm": True},
    "vit": {
        "arch": "vit",
        "patch_size": 4,
        "dim": 16,
        "depth": 1,
        "heads": 2,
        "mlp_ratio": 2.0,
        "dropout": 0.0,
        "pool": "cls",
        "normalize": {"mean": [0.2], "std": [0.3]},
    },
}
TEXT = {"vocab_size": 50, "max_len": 24, "pad_id": 0, "bos_id": 2, "eos_id": 3}


def images(n: int, seed: int = 0) -> ImageData:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 1, 16, 16), dtype=np.uint8)
    return ImageData([Part(x, np.zeros(n, np.int64))], ["a", "b", "c"], {})


def tokens(n: int, seed: int = 0) -> TokenData:
    """Right-padded token rows of every length from 1 to ``max_len``."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, TEXT["max_len"]), np.int64)
    for i in range(n):
        length = 1 + i % TEXT["max_len"]
        ids[i, :length] = rng.integers(5, TEXT["vocab_size"], length)
    return TokenData([Part(ids, np.zeros(n, np.int64))], ["a", "b", "c"], TEXT, 0)


@pytest.mark.parametrize("arch", sorted(IMAGE_MODELS))
def test_image_models_export_with_a_dynamic_batch(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_classifier(IMAGE_MODELS[arch], 1, 16, 3).eval()
    path = tmp_path / "model.onnx"
    diff = export_checked(model, images(70), path)  # batches of 64 and 6
    assert path.exists() and diff < 1e-4
    runtime = OnnxClassifier(path)
    one = images(1, seed=5)
    assert logits_difference(model, runtime, one) < 1e-4
    np.testing.assert_allclose(
        predict_proba(runtime, one), predict_proba(model, one), rtol=0, atol=1e-5
    )
    pixels = images(9, seed=6).parts[0].items  # the service's numpy path, uint8 pixels
    np.testing.assert_allclose(
        runtime.proba_pixels(pixels, batch_size=4), predict_proba(model, pixels), atol=1e-5
    )


@pytest.mark.parametrize(("arch", "pool"), [("llama", "last"), ("bert", "mean")])
def test_text_models_export_with_dynamic_batch_and_sequence(
    arch: str, pool: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    cfg = {
        "arch": arch,
        "dim": 16,
        "depth": 2,
        "heads": 2,
        "mlp_ratio": 2.0,
        "dropout": 0.0,
        "pool": pool,
        **TEXT,
    }
    model = build_classifier(cfg, 1, TEXT["max_len"], 3).eval()
    path = tmp_path / "model.onnx"
    diff = export_checked(model, tokens(40), path)
    assert diff < 1e-4
    runtime = OnnxClassifier(path)
    # other batch sizes and lengths than the traced batch (2 rows of lengths 1 and 2)
    for n, seed in ((1, 3), (7, 4), (TEXT["max_len"], 5)):
        assert logits_difference(model, runtime, tokens(n, seed)) < 1e-4
    rows = tokens(30, 6)
    np.testing.assert_allclose(
        runtime.proba_tokens(rows.parts[0].items, 0, batch_size=8),
        predict_proba(model, rows),
        atol=1e-5,
    )
    # the log-probabilities a word model is added to: exact log-softmax, no rounding to 0
    log_p = runtime.log_proba_tokens(rows.parts[0].items, 0, batch_size=8)
    assert log_p.dtype == np.float64
    np.testing.assert_allclose(log_p, np.log(predict_proba(model, rows)), atol=1e-4)


def test_texts_answer_alike_on_both_runtimes(tmp_path: Path) -> None:
    from graftline.config import TokenizerParams
    from graftline.data.text import token_spec, train_tokenizer

    texts = ["great coffee 好", "awful tea", "ok biscuits 😀 " * 30, "fine"] * 5
    p = TokenizerParams(vocab_size=300, max_len=16)
    spec = token_spec(train_tokenizer(texts, p), p, 100)
    cfg = {"arch": "llama", "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0}
    cfg = {**cfg, "dropout": 0.0, "pool": "mean", **{k: spec[k] for k in TEXT}}
    torch.manual_seed(0)
    model = build_classifier(cfg, 1, 16, 2).eval()
    from graftline.serve.predict import encode_texts

    ids, _ = encode_texts(spec, texts)
    module = TokenData([Part(ids, np.zeros(len(ids), np.int64))], ["x", "y"], spec, 0)
    export_checked(model, module, tmp_path / "model.onnx")
    torch_answers = predict_frame(model, ["x", "y"], texts, transform=spec)
    onnx_answers = predict_frame(
        OnnxClassifier(tmp_path / "model.onnx"), ["x", "y"], texts, transform=spec
    )
    assert torch_answers["class"].tolist() == onnx_answers["class"].tolist()
    assert torch_answers["truncated"].tolist() == onnx_answers["truncated"].tolist()
    np.testing.assert_allclose(onnx_answers["p_x"], torch_answers["p_x"], atol=1e-5)


def test_an_export_that_disagrees_fails_and_leaves_no_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_classifier(IMAGE_MODELS["cnn"], 1, 16, 3).eval()
    path = tmp_path / "model.onnx"
    export_checked(model, images(8), path)
    other = build_classifier(IMAGE_MODELS["cnn"], 1, 16, 3).eval()  # other weights
    assert logits_difference(other, OnnxClassifier(path), images(8)) > 1e-3
    # the check itself: a tolerance below what float32 kernels can promise
    with pytest.raises(ExportError, match=r"differ from PyTorch's by .* \(tolerance 1e-30\)"):
        export_checked(model, images(8), path, tolerance=1e-30)
    assert not path.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_text_backbone_saved_for_hugging_face_loads_back_equal(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from graftline.config import TokenizerParams
    from graftline.data.text import token_spec, train_tokenizer
    from graftline.export import export_huggingface_backbone
    from graftline.serve.predict import encode_texts

    texts = ["great coffee 好吃", "awful tea, stale biscuits", "ok 😀 " * 20, "fine"] * 3
    p = TokenizerParams(vocab_size=300, max_len=16)
    spec = token_spec(train_tokenizer(texts, p), p, 100)
    cfg = {"arch": arch, "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0}
    cfg = {**cfg, "dropout": 0.0, "pool": "mean", **{k: spec[k] for k in TEXT}}
    torch.manual_seed(0)
    backbone = build_classifier(cfg, 1, 16, 0).backbone.eval()
    folder = tmp_path / "huggingface"
    assert export_huggingface_backbone(backbone, spec, folder, encode_texts(spec, texts)[0]) < 1e-4
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    # as a user of any Hugging Face tool would load it: offline, no remote code
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert type(model).__name__ == {"llama": "LlamaModel", "bert": "BertModel"}[arch]
    batch = tok(texts[:3], padding=True, truncation=True, return_tensors="pt")
    ids, _ = encode_texts(spec, texts[:3])
    assert batch["input_ids"].tolist() == ids[:, : batch["input_ids"].shape[1]].tolist()
    with torch.no_grad():
        theirs = model(**batch).last_hidden_state
        ours = backbone.hidden(
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].bool()}
        )
    real = batch["attention_mask"].bool()
    assert float((theirs - ours)[real].abs().max()) < 1e-4
    assert tok.decode(tok(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]


@pytest.mark.parametrize(("arch", "pool"), [("llama", "last"), ("bert", "cls"), ("llama", "mean")])
def test_a_text_classifier_exports_as_its_hugging_face_class(
    arch: str, pool: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from graftline.config import TokenizerParams
    from graftline.data.text import token_spec, train_tokenizer
    from graftline.export import export_huggingface_classifier
    from graftline.serve.predict import encode_texts

    texts = ["great coffee 好吃", "awful tea, stale biscuits", "ok 😀 " * 20, "fine"] * 3
    p = TokenizerParams(vocab_size=300, max_len=16)
    spec = token_spec(train_tokenizer(texts, p), p, 100)
    cfg = {"arch": arch, "dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 2.0}
    cfg = {**cfg, "dropout": 0.0, "pool": pool, **{k: spec[k] for k in TEXT}}
    torch.manual_seed(0)
    model = build_classifier(cfg, 1, 16, 3).eval()
    classes = ["great", "other", "meh"]
    folder = tmp_path / "hf"
    ids = encode_texts(spec, texts)[0]
    if pool == "mean":  # no Hugging Face class reads the mean of the states
        with pytest.raises(ExportError, match="mean-pooled"):
            export_huggingface_classifier(model, classes, spec, folder, ids)
        assert not folder.exists()
        return
    assert export_huggingface_classifier(model, classes, spec, folder, ids) < 1e-4
    hf = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert hf.config.id2label == {0: "great", 1: "other", 2: "meh"}
    assert hf.config.label2id["meh"] == 2
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    probs = predict_frame(model, classes, texts, transform=spec)
    with torch.no_grad():
        logits = hf.eval()(**batch).logits
    assert [classes[i] for i in logits.argmax(1).tolist()] == probs["class"].tolist()
    np.testing.assert_allclose(
        torch.softmax(logits, 1)[:, 0].numpy(), probs["p_great"].to_numpy(), atol=1e-5
    )
