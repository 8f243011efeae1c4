"""Starting from somebody else's checkpoint: a tiny Hugging Face encoder and decoder, saved
with save_pretrained beside their tokenizers, fine-tuned through the Prefect flow with lora
(encoder) and full (decoder). Each registered version names the checkpoint and its hash (card
and lineage tags), exports to Hugging Face with the evaluated answers, serves alike on ONNX
Runtime, and DVC re-runs preprocess and pretrain when the checkpoint changes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from flows.pipeline import pipeline
from graftline import tracking
from graftline.config import FineFoodSource
from graftline.data.text import load_fine_food
from graftline.hub import folder_sha256
from graftline.serve.app import create_app
from graftline.serve.champion import ChampionFollower
from tests.conftest import dvc, make_repo, tool_env
from tests.hub_checkpoints import save_tiny_checkpoint
from tests.integration.test_text import assert_hugging_face_answers_as

pytestmark = pytest.mark.usefixtures("prefect_harness")

NAME = "graftline-fine-food"


def _params(arch: str, strategy: str, distill: bool = False) -> dict:
    path = f"checkpoints/tiny-{arch}"
    return {
        "preprocess": {
            "seed": 0,
            "tokenizer": {"path": path, "max_len": 48},
            "pretrain": {"source": {"kind": "fine_food", "labels": "ignore"}, "limit": 300},
            "task": {"source": {"kind": "fine_food"}, "labels_per_class": 20, "val_fraction": 0.05},
        },
        "pretrain": {"init": {"kind": "huggingface", "path": path}},
        "finetune": {
            "strategy": strategy,
            "lora": {"rank": 4, "alpha": 8.0},
            "train": {"epochs": 2, "batch_size": 20, "lr": 0.003, "num_threads": 1},
        },
        "distill": {  # the student: the checkpoint's architecture, from scratch
            "enabled": distill,
            "corpus_limit": 200,
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "num_threads": 1},
        },
        "evaluate": {"tfidf": {"C": 10.0, "ngrams": 2}},
        "deploy": {"gate": {"min_accuracy": 0.3}},
    }


def _evaluated(repo: Path, model: str = "finetuned") -> tuple[list[str], list[str]]:
    """Some test texts and ``model``'s classes for them, as evaluate scored."""
    texts = json.loads((repo / "data/processed/task/test.texts.json").read_text())
    some = list(range(0, 1000, 50))
    evaluated = pd.read_csv(repo / "reports/evaluate/predictions.csv")
    return [texts[i] for i in some], evaluated[model].astype(str).iloc[some].tolist()


def test_hugging_face_checkpoints_fine_tune_through_the_flow(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path_factory.mktemp("hubrepo"), _params("bert", "lora"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.EXPERIMENT_ENV, raising=False)
    corpus, _ = load_fine_food(FineFoodSource(kind="fine_food"))
    texts = [str(t) for t in corpus.images[:1200]]
    for arch in ("bert", "llama"):
        save_tiny_checkpoint(repo / f"checkpoints/tiny-{arch}", arch, texts, max_positions=48)

    # the encoder, with LoRA adapters merged on export
    result = pipeline(root=str(repo))
    assert result["deploy"]["version"] == "1", result["deploy"]
    metrics = json.loads((repo / "reports/finetune/metrics.json").read_text())
    assert 0 < metrics["finetuned"]["trainable_fraction"] < 0.2  # adapters and head only
    tracking.configure(repo)
    client = MlflowClient()
    v1 = client.get_model_version(NAME, "1")
    sha = folder_sha256(repo / "checkpoints/tiny-bert")
    assert v1.tags["graftline.init.path"] == "checkpoints/tiny-bert"
    assert v1.tags["graftline.init.sha256"] == sha
    assert v1.tags["graftline.init.model_type"] == "bert"
    assert "checkpoint `checkpoints/tiny-bert` (bert, BertForMaskedLM" in v1.description
    assert sha[:16] in v1.description and "strategy `lora`" in v1.description
    assert "the checkpoint's (WordPiece) from `checkpoints/tiny-bert`" in v1.description
    assert v1.tags["graftline.export.huggingface"] == "BertForSequenceClassification"
    assert float(v1.tags["graftline.export.onnx_max_abs_diff"]) < 1e-4
    some, expected = _evaluated(repo)
    assert_hugging_face_answers_as(NAME, "1", some, expected)
    answers = {}
    for runtime in ("torch", "onnx"):
        follower = ChampionFollower(NAME, client, 3600, runtime=runtime)
        with TestClient(create_app(follower, max_batch=32)) as c:
            answers[runtime] = c.post("/predict", json={"texts": some}).json()["predictions"]
    assert [a["class"] for a in answers["torch"]] == expected  # served as evaluated
    for a, b in zip(answers["onnx"], answers["torch"], strict=True):
        assert a["class"] == b["class"] and abs(a["probability"] - b["probability"]) < 1e-5

    env = tool_env(repo)
    status = dvc(repo, env, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    # another checkpoint in the same folder: DVC sees it, from the tokenizer on
    save_tiny_checkpoint(repo / "checkpoints/tiny-bert", "bert", texts, max_positions=48, seed=1)
    status = dvc(repo, env, "status")
    assert "preprocess:" in status.stdout and "pretrain:" in status.stdout, status.stdout
    assert "modified:           checkpoints" in status.stdout, status.stdout

    # the decoder, fine-tuned in full, then distilled into a student that deploys
    params = _params("llama", "full", distill=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = pipeline(root=str(repo))
    assert result["deploy"]["version"] == "2", result["deploy"]
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["graftline.init.path"] == "checkpoints/tiny-llama"
    assert v2.tags["graftline.init.sha256"] == folder_sha256(repo / "checkpoints/tiny-llama")
    assert v2.tags["graftline.export.huggingface"] == "LlamaForSequenceClassification"
    assert "LlamaForCausalLM" in v2.description and "strategy `full`" in v2.description
    assert "this is the student distilled" in v2.description
    some, expected = _evaluated(repo, "student")
    assert_hugging_face_answers_as(NAME, "2", some, expected)
    status = dvc(repo, env, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
