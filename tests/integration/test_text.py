"""Text end to end: the packaged fine-food reviews through the Prefect flow (tokenizer,
a Llama-style decoder pretrained on the unlabelled corpus, LoRA fine-tuning, distillation
and label propagation on the corpus, TF-IDF + LR baseline, gate, registry, card), then the
service and batch prediction answer the test split's own texts as evaluate did, and refuse
bad text requests with a 4xx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from flows.pipeline import pipeline
from graftline import tracking
from graftline.serve.app import create_app
from graftline.serve.champion import ChampionFollower
from tests.conftest import dvc, make_repo, tool_env
from tests.integration.conftest import graftline_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

TEXT_PARAMS = {
    "preprocess": {
        "seed": 0,
        "tokenizer": {"vocab_size": 800, "max_len": 64},
        "pretrain": {"source": {"kind": "fine_food", "labels": "ignore"}, "limit": 800},
        "task": {"source": {"kind": "fine_food"}, "labels_per_class": 20, "val_fraction": 0.05},
    },
    "pretrain": {
        "objective": "causal_lm",
        "model": {
            "arch": "llama",
            "dim": 32,
            "depth": 1,
            "heads": 2,
            "mlp_ratio": 2.0,
            "pool": "last",  # LlamaForSequenceClassification's reading: it exports as one
        },
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "num_threads": 1},
    },
    "finetune": {
        "strategy": "lora",
        "lora": {"rank": 4, "alpha": 8.0},
        "train": {"epochs": 2, "batch_size": 20, "lr": 0.003, "num_threads": 1},
    },
    "distill": {  # soft targets over the corpus, then a round of label propagation
        "enabled": True,
        "teacher": "both",  # the fine-tuned model's and naive Bayes + EM's, multiplied
        "corpus_limit": 300,
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "num_threads": 1},
        "propagate": {"rounds": 1, "epochs": 1, "pca": 8, "neighbours": 10},
    },
    "evaluate": {"tfidf": {"C": 10.0, "ngrams": 2}},
    "deploy": {"gate": {"min_accuracy": 0.3}},  # model_name: graftline-fine-food
}


def test_text_trains_through_the_flow_and_serves_as_evaluated(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path_factory.mktemp("textrepo"), TEXT_PARAMS)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.EXPERIMENT_ENV, raising=False)
    monkeypatch.delenv("GRAFTLINE_API_TOKEN", raising=False)

    result = pipeline(root=str(repo))
    assert result["deploy"]["promoted"], result["deploy"]["decision"]
    name = "graftline-fine-food"
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert {"finetuned", "student", "scratch", "tfidf_lr"} <= set(metrics)
    assert "svc" not in metrics
    status = dvc(repo, tool_env(repo), "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    assert metrics["test_size"] == 1000  # the testing reviews, all of them
    distilled = json.loads((repo / "reports/distill/metrics.json").read_text())
    assert distilled["teacher"] == "both" and distilled["corpus_images"] == 300
    history = pd.read_csv(repo / "reports/pretrain/history.csv")
    assert {"val_perplexity", "val_knn_acc"} <= set(history.columns)
    assert (repo / "data/processed/task/tokenizer.json").exists()
    # the pretrained backbone, for any Hugging Face tool (a DVC output of pretrain)
    from transformers import AutoModel, AutoTokenizer

    hf = repo / "models/pretrained/huggingface"
    assert type(AutoModel.from_pretrained(hf, local_files_only=True)).__name__ == "LlamaModel"
    assert AutoTokenizer.from_pretrained(hf, local_files_only=True)("好")["input_ids"][0] == 2

    evaluated = pd.read_csv(repo / "reports/evaluate/predictions.csv")
    texts = json.loads((repo / "data/processed/task/test.texts.json").read_text())
    some = list(range(0, 1000, 40))
    texts_some = [texts[i] for i in some]
    expected = evaluated["student"].astype(str).iloc[some].tolist()  # the student deploys

    table = repo / "reviews.jsonl"
    pd.DataFrame({"review": texts_some}).to_json(table, orient="records", lines=True)
    out = repo / "predicted.csv"
    done = graftline_cli(repo, "predict", str(table), "--text-column", "review", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(out)["class"].astype(str).tolist() == expected
    lines = repo / "reviews.txt"
    lines.write_text("\n".join(t.replace("\n", " ") for t in texts_some[:3]) + "\n\n")
    done = graftline_cli(repo, "predict", str(lines), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(out)["id"].tolist() == ["line 1", "line 2", "line 3"]

    tracking.configure(repo)
    version = MlflowClient().get_model_version(name, "1")
    assert "Input: texts; tokenizer byte-level BPE with 800 tokens" in version.description
    assert "from that model and naive Bayes trained with EM" in version.description
    assert float(version.tags["graftline.export.onnx_max_abs_diff"]) < 1e-4
    assert version.tags["graftline.export.huggingface"] == "LlamaForSequenceClassification"
    assert_hugging_face_answers_as(name, "1", texts_some, expected)
    follower = ChampionFollower(name, MlflowClient(), poll_seconds=3600)
    with TestClient(create_app(follower, max_batch=8)) as c:
        assert c.get("/ready").json()["input"] == "text"
        served = []
        for start in range(0, len(texts_some), 8):
            answer = c.post("/predict", json={"texts": texts_some[start : start + 8]})
            assert answer.status_code == 200, answer.text
            served += answer.json()["predictions"]
        assert [p["class"] for p in served] == expected
        assert all(len(p["top"]) == 2 and "truncated" in p for p in served)
        long = c.post("/predict", json={"texts": ["great " * 200, "好吃 😀"]}).json()
        assert [p["truncated"] for p in long["predictions"]] == [True, False]

        refused = {
            "empty": c.post("/predict", json={"texts": []}),
            "not a string": c.post("/predict", json={"texts": ["fine", 12]}),
            "blank": c.post("/predict", json={"texts": ["  "]}),
            "too many": c.post("/predict", json={"texts": ["a"] * 9}),
            "pixels": c.post("/predict", json={"inputs": [[0.0] * 784]}),
            "upload": c.post("/predict/image", files=[("files", ("a.png", b"x", "image/png"))]),
            "too long": c.post("/predict", json={"texts": ["x" * 100_001]}),
        }
    codes = {k: r.status_code for k, r in refused.items()}
    assert codes == {
        "empty": 400,
        "not a string": 400,
        "blank": 400,
        "too many": 413,
        "pixels": 422,
        "upload": 400,
        "too long": 413,
    }, {k: r.text for k, r in refused.items()}
    assert "texts[1]: not a string (int)" in refused["not a string"].json()["detail"]
    assert "texts: field required (this model reads texts" in refused["pixels"].json()["detail"]


def hugging_face_proba(name: str, version: str, texts: list[str]) -> np.ndarray:
    """Class probabilities of ``texts`` from the version's Hugging Face folder, loaded by
    ``transformers`` alone (offline, no graftline code), columns in ``id2label`` order."""
    import mlflow
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    (folder,) = [p.parent for p in root.rglob("config.json") if p.parent.name == "huggingface"]
    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        logits = model.eval()(**tok(texts, padding=True, truncation=True, return_tensors="pt"))
    return torch.softmax(logits.logits, dim=1).numpy()


def assert_hugging_face_answers_as(
    name: str, version: str, texts: list[str], expected: list[str]
) -> None:
    """The version's Hugging Face folder classifies ``texts`` as ``expected``."""
    import mlflow
    from transformers import AutoConfig

    root = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    (folder,) = [p.parent for p in root.rglob("config.json") if p.parent.name == "huggingface"]
    labels = AutoConfig.from_pretrained(folder, local_files_only=True).id2label
    top = hugging_face_proba(name, version, texts).argmax(1).tolist()
    assert [labels[i] for i in top] == expected


@pytest.mark.parametrize("text_root", [False, True], ids=["network", "with-nb-em"], indirect=True)
def test_a_text_model_answers_alike_on_onnx_runtime(text_root: Path) -> None:
    """The registered text model's model.onnx (dynamic batch and sequence), tokenized by
    the same tokenizer: the service and batch prediction answer as on PyTorch. A model
    carrying naive Bayes + EM (``finetune.nb_em``) answers the network's distribution times
    the word model's, normalised, on either runtime; its exports are the network alone."""
    texts = ["great great lovely coffee", "awful stale bad", "ok " * 40, "好 😀", "fine average"]
    answers = {}
    for runtime in ("torch", "onnx"):
        follower = ChampionFollower("blob-texts", MlflowClient(), 3600, runtime=runtime)
        with TestClient(create_app(follower)) as c:
            assert c.get("/ready").json()["runtime"] == runtime
            assert c.get("/model").json()["runtime"] == runtime
            answers[runtime] = c.post("/predict", json={"texts": texts}).json()["predictions"]
    for a, b in zip(answers["onnx"], answers["torch"], strict=True):
        assert (a["class"], a["truncated"]) == (b["class"], b["truncated"])
        assert abs(a["probability"] - b["probability"]) < 1e-5
    (text_root / "params.yaml").write_text(json.dumps({"deploy": {"model_name": "blob-texts"}}))
    (text_root / "in.txt").write_text("\n".join(texts) + "\n")
    done = graftline_cli(text_root, "predict", "in.txt", "--runtime", "onnx", "--out", "o.csv")
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(text_root / "o.csv")["class"].astype(str).tolist() == [
        a["class"] for a in answers["torch"]
    ]
    version = MlflowClient().get_model_version("blob-texts", "1")
    from graftline.models.checkpoint import load_checkpoint
    from graftline.nb_em import texts_of_ids
    from graftline.serve.predict import encode_texts

    model, ckpt = load_checkpoint(text_root / "models/finetuned/model.pt")
    if model.words is None:
        assert "**Word model.**" not in version.description
        served = [a["class"] for a in answers["torch"]]
        assert_hugging_face_answers_as("blob-texts", "1", texts, served)
        return
    assert "**Word model.** Its class distribution is the network's multiplied" in (
        version.description
    )
    network = hugging_face_proba("blob-texts", "1", texts)  # the network's part, exported
    ids, _ = encode_texts(ckpt["transform"], texts)
    product = network * model.words.predict_proba(texts_of_ids(ids, ckpt["transform"]))
    product /= product.sum(1, keepdims=True)
    assert not np.allclose(product.max(1), network.max(1), atol=1e-2)  # the words count
    for runtime in ("torch", "onnx"):
        got = np.array([a["top"][0]["probability"] for a in answers[runtime]])
        assert np.allclose(got, product.max(1), atol=1e-4), runtime
