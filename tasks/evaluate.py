"""Stage ``evaluate``: score the fine-tuned model (the teacher), the distilled student when
distillation is on, the scratch baseline and a classic baseline (an SVC on pixels; for text,
TF-IDF + logistic regression) on the test split, side by side."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from graftline import layout as paths
from graftline.config import Params
from graftline.data.modules import data_module
from graftline.data.store import load_split
from graftline.data.text import is_text_data
from graftline.errors import ArtifactError
from graftline.evaluate import (
    classification_metrics,
    plot_confusion,
    plot_learning_curves,
    plot_reliability,
    svc_baseline,
    svc_proba,
    tfidf_baseline,
    tfidf_proba,
)
from graftline.io import write_json, write_text
from graftline.models.checkpoint import load_checkpoint
from graftline.train import predict_proba
from tasks._stage import stage_main

log = logging.getLogger("graftline.evaluate")

MODELS = {"finetuned": paths.FINETUNED, "student": paths.STUDENT, "scratch": paths.SCRATCH}


def run(
    params: Params,
    data: Path = paths.TASK_DATA,
    models: dict[str, Path] | None = None,
    histories: dict[str, Path] | None = None,
    metrics_path: Path = paths.METRICS,
    report: Path = paths.EVALUATE_REPORT,
) -> dict[str, Any]:
    """Score the fine-tuned model, the scratch baseline and a classic baseline (SVC, or
    TF-IDF + logistic regression for text) on the task test split."""
    p = params.evaluate
    models = models or MODELS
    histories = histories or {
        "pretrain": paths.PRETRAIN_REPORT / "history.csv",
        "finetuned": paths.FINETUNE_REPORT / "finetuned_history.csv",
        "scratch": paths.FINETUNE_REPORT / "scratch_history.csv",
        "student": paths.DISTILL_REPORT / "history.csv",
    }
    train, test = load_split(data, "train"), load_split(data, "test")
    probas: dict[str, np.ndarray] = {}
    for name, root in models.items():
        if name == "student" and not (root / paths.MODEL_FILE).exists():
            continue  # distillation is off
        model, ckpt = load_checkpoint(root / paths.MODEL_FILE)
        if ckpt["classes"] != test.classes:
            raise ArtifactError(
                f"{root / paths.MODEL_FILE}: classes {ckpt['classes']} differ from the test "
                f"split's {test.classes}"
            )
        probas[name] = predict_proba(model, data_module(test))
    if is_text_data(test):
        tfidf = tfidf_baseline(train, C=p.tfidf.C, ngrams=p.tfidf.ngrams)
        probas["tfidf_lr"] = tfidf_proba(tfidf, test, len(test.classes))
    else:
        svc = svc_baseline(train, C=p.svc.C, gamma=p.svc.gamma)
        probas["svc"] = svc_proba(svc, test, len(test.classes))

    metrics: dict[str, Any] = {
        name: classification_metrics(test.labels, pr, test.classes, p.ece_bins)
        for name, pr in probas.items()
    }
    metrics["test_size"] = len(test)
    metrics["train_labels"] = len(train)
    write_json(metrics_path, metrics)

    preds = pd.DataFrame({"id": test.ids, "actual": [test.classes[i] for i in test.labels]})
    for name, pr in probas.items():
        preds[name] = [test.classes[i] for i in pr.argmax(1)]
        preds[f"{name}_confidence"] = pr.max(1).round(6)
    write_text(report / "predictions.csv", preds.to_csv(index=False))
    plot_confusion(
        {n: (test.labels, pr.argmax(1)) for n, pr in probas.items()},
        test.classes,
        report / "confusion.png",
    )
    plot_reliability({n: (test.labels, pr) for n, pr in probas.items()}, report / "calibration.png")
    curves = {n: pd.read_csv(h) for n, h in histories.items() if Path(h).exists()}
    curves = {n: c for n, c in curves.items() if len(c)}
    if curves:
        plot_learning_curves(curves, report / "learning_curves.png")
    summary = ", ".join(f"{n} acc={metrics[n]['accuracy']:.4f}" for n in probas)
    log.info("evaluate (%d test items, %d train labels): %s", len(test), len(train), summary)
    return {
        "metrics": metrics,
        "artifacts": [metrics_path, *sorted(report.glob("*.png")), report / "predictions.csv"],
    }


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", run))
