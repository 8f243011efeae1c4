"""Metrics, the classical baseline, and the plots of the evaluation report."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.svm import SVC

from graftline.data.dataset import Dataset
from graftline.io import atomic_path


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def classification_metrics(
    y: np.ndarray, proba: np.ndarray, classes: list[str], ece_bins: int = 15
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision and recall, and ECE."""
    pred = proba.argmax(axis=1)
    labels = list(range(len(classes)))
    prec, rec, _, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "ece": expected_calibration_error(proba, y, ece_bins),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "support": int(s)}
            for c, p, r, s in zip(classes, prec, rec, support, strict=True)
        },
    }


# Every model evaluate may score, in the order reports show them: the networks, then the
# baseline of the data's kind (an SVC on pixels for images, TF-IDF + logistic regression for
# text).
MODEL_NAMES = ("finetuned", "student", "scratch", "svc", "tfidf_lr")


def token_documents(ds: Dataset) -> list[str]:
    """Each text's token ids, ``<s>``, ``</s>`` and padding left out, as a string of words:
    what the TF-IDF baseline reads (the corpus tokenizer's tokens are its vocabulary)."""
    t = ds.transform
    drop = np.array([t[k] for k in ("pad_id", "bos_id", "eos_id") if t.get(k) is not None])
    return [" ".join(map(str, row[~np.isin(row, drop)])) for row in np.asarray(ds.images)]


def tfidf_baseline(train: Dataset, C: float = 10.0, ngrams: int = 2) -> Pipeline:
    """TF-IDF over the tokenizer's tokens (1- to ``ngrams``-grams, sublinear term frequency)
    and a logistic regression, trained on the same labels as the networks: the classic text
    classifier a pretrained model has to beat."""
    vectorizer = TfidfVectorizer(
        token_pattern=r"\S+", lowercase=False, ngram_range=(1, ngrams), sublinear_tf=True
    )
    model = make_pipeline(vectorizer, LogisticRegression(C=C, max_iter=2000))
    return model.fit(token_documents(train), train.labels)


def tfidf_proba(model: Pipeline, ds: Dataset, num_classes: int) -> np.ndarray:
    out = np.zeros((len(ds), num_classes))
    out[:, model.classes_] = model.predict_proba(token_documents(ds))
    return out


def svc_baseline(
    train: Dataset, C: float = 10.0, gamma: float | str = "scale"
) -> tuple[SVC, CalibratedClassifierCV]:
    """An RBF SVC on raw pixels in [0, 1], trained on the same labels as the networks.

    Returns the SVC (its votes are the baseline's predictions) and a sigmoid-calibrated copy
    (its probabilities feed ECE and the calibration plot).
    """
    x = train.images.reshape(len(train), -1) / 255.0
    svc = SVC(C=C, gamma=gamma).fit(x, train.labels)
    folds = int(min(5, np.bincount(train.labels).min()))
    if folds < 2:
        return svc, None
    cal = CalibratedClassifierCV(SVC(C=C, gamma=gamma), cv=folds, ensemble=False)
    return svc, cal.fit(x, train.labels)


def svc_proba(
    models: tuple[SVC, CalibratedClassifierCV | None], ds: Dataset, num_classes: int
) -> np.ndarray:
    svc, cal = models
    x = ds.images.reshape(len(ds), -1) / 255.0
    votes = svc.predict(x)
    out = np.zeros((len(ds), num_classes))
    if cal is None:
        out[np.arange(len(ds)), votes] = 1.0
        return out
    # Columns follow the classes the calibrator saw; put them back in class-index order.
    out[:, cal.classes_] = cal.predict_proba(x)
    # Calibration may disagree with the SVC's own vote; the vote is the prediction.
    top = out.max(axis=1, keepdims=True)
    fix = out.argmax(axis=1) != votes
    out[fix, votes[fix]] = top[fix, 0] + 1e-6
    return out / out.sum(axis=1, keepdims=True)


def _save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(
    results: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], path: Path
) -> None:
    """One confusion matrix per model, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (name, (y, pred)) in zip(axes[0], results.items(), strict=True):
        cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > cm.max() / 2 else "black",
                )
        ax.set_xticks(range(len(classes)), classes, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: acc {np.mean(y == pred):.3f}")
    _save_fig(fig, path)


def plot_learning_curves(histories: dict[str, pd.DataFrame], path: Path) -> None:
    """Train and validation loss and accuracy per epoch, one line pair per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, h in histories.items():
        line = ax_loss.plot(h["epoch"], h["train_loss"], label=f"{name} train")[0]
        color = line.get_color()
        if "val_loss" in h:
            ax_loss.plot(h["epoch"], h["val_loss"], "--", color=color, label=f"{name} val")
        for col, style, label in (
            ("val_acc", "--", "val"),
            ("val_knn_acc", ":", "val k-NN"),  # pretraining without labels
            ("train_acc", "-", "train"),
        ):
            if col in h:
                ax_acc.plot(h["epoch"], h[col], style, color=color, label=f"{name} {label}")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend(fontsize=7)
    _save_fig(fig, path)


def plot_reliability(
    results: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 10
) -> None:
    """Reliability diagram: accuracy against confidence, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    edges = np.linspace(0, 1, bins + 1)
    for name, (y, proba) in results.items():
        conf, correct = proba.max(1), proba.argmax(1) == y
        xs, ys = [], []
        for lo, hi in itertools.pairwise(edges):
            m = (conf > lo) & (conf <= hi)
            if m.any():
                xs.append(conf[m].mean())
                ys.append(correct[m].mean())
        ax.plot(xs, ys, "o-", label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", title="calibration")
    ax.legend(fontsize=8)
    _save_fig(fig, path)


def per_class_accuracy(labels: np.ndarray, correct: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy within each true class (NaN for a class with no test item)."""
    totals = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=correct.astype(float), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / np.maximum(totals, 1), np.nan)


def plot_per_class(classes: list[str], accuracies: dict[str, np.ndarray], path: Path) -> None:
    """Per-class test accuracy, one bar per model and class (the challenger beside the
    champion): where a new model gains and where it loses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(classes) * len(accuracies)), 3.6))
    width = 0.8 / len(accuracies)
    x = np.arange(len(classes))
    for i, (name, acc) in enumerate(accuracies.items()):
        ax.bar(x + (i - (len(accuracies) - 1) / 2) * width, acc, width, label=name)
    ax.set_xticks(x, classes)
    low = np.nanmin([np.nanmin(a) for a in accuracies.values()])
    ax.set(xlabel="class", ylabel="test accuracy", ylim=(max(0.0, low - 0.1), 1.0))
    ax.set_title("per-class accuracy")
    ax.legend(fontsize=8, loc="lower right")
    _save_fig(fig, path)


def plot_label_efficiency(table: pd.DataFrame, path: Path, n_test: int | None = None) -> None:
    """Test accuracy against labels per class (``benchmarks/bench_label_efficiency.py``):
    fine-tuned vs scratch vs SVC. The gap at few labels is what pretraining buys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = np.arange(len(table))
    for name, style in (("finetuned", "o-"), ("scratch", "s--"), ("svc", "^:")):
        col = f"{name}_accuracy"
        if col in table:
            ax.plot(x, table[col], style, label=name)
    ax.set_xticks(
        x,
        [
            f"{b}\n({n})"
            for b, n in zip(table["labels_per_class"], table["train_labels"], strict=True)
        ],
    )
    ax.set(xlabel="labels per class (labelled examples)", ylabel="test accuracy", ylim=(0, 1))
    title = "label efficiency"
    ax.set_title(f"{title} ({n_test} test items)" if n_test else title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save_fig(fig, path)
