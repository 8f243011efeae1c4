"""Stage ``distill``: the fine-tuned model labels the pretraining corpus with soft targets, and a
student trains on them plus the labelled set (the third step of "pretrain, fine-tune, distil").
Then, if asked, it goes on learning from the corpus: FixMatch-style consistency
(``distill.consistency``), then rounds of label propagation over its features
(``distill.propagate``).

Off by default (``distill.enabled: false``): the stage then writes a note in place of the
student, and the fine-tuned model is the one that deploys.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graftline import distributed, nb_em
from graftline import layout as paths
from graftline.config import Params
from graftline.data.dataset import Dataset
from graftline.data.modules import DataModule, Part, data_module, module_of
from graftline.data.store import load_split, read_manifest
from graftline.data.text import is_text_data
from graftline.errors import ArtifactError
from graftline.io import file_sha256, write_json, write_text
from graftline.models import build_classifier, save_checkpoint
from graftline.models.checkpoint import load_checkpoint
from graftline.models.classifier import Classifier, input_dims
from graftline.models.text import text_model_config
from graftline.objectives import Consistency, Distillation, features
from graftline.propagation import propagate_labels, reduce_features
from graftline.train import FitResult, fit, predict_proba
from tasks._stage import stage_main
from tasks._training import record_environment, run_identity, write_history

log = logging.getLogger("graftline.distill")

OFF_NOTE = "off.json"  # what models/student holds when distillation is off


def run(
    params: Params,
    corpus: Path = paths.PRETRAIN_DATA,
    data: Path = paths.TASK_DATA,
    teacher: Path = paths.FINETUNED,
    out: Path = paths.STUDENT,
    reports: Path = paths.DISTILL_REPORT,
    checkpoints: Path = paths.CHECKPOINTS,
    pretrained: Path = paths.PRETRAINED,
) -> dict[str, Any]:
    """Distil the fine-tuned model into a student on the unlabelled corpus and the labels."""
    d = params.distill
    if not d.enabled:
        note = {"enabled": False, "why": "distill.enabled is false: the fine-tuned model deploys"}
        write_json(out / OFF_NOTE, note)
        write_json(reports / "metrics.json", {"enabled": False})
        write_text(reports / "history.csv", "epoch,train_loss,val_loss,val_acc\n")
        log.info("distill: off (distill.enabled: false); the fine-tuned model deploys")
        return {"metrics": {"enabled": 0.0}}

    teacher_model, tck = load_checkpoint(teacher / paths.MODEL_FILE)
    # The corpus stays on disk, memory-mapped: every pass below reads it a batch at a time
    # and the student's training set is its rows beside the labelled set's, never one array.
    pool = load_split(corpus, "train", mmap=True)
    train, val = load_split(data, "train"), load_split(data, "val")
    shape = tuple(train.images.shape[1:])
    if tuple(pool.images.shape[1:]) != shape:
        raise ArtifactError(
            f"{corpus}: corpus items are {tuple(pool.images.shape[1:])}, the task's {shape}; "
            "the teacher can only label inputs of its own shape"
        )
    rows = np.arange(len(pool))
    if d.corpus_limit and d.corpus_limit < len(pool):
        rows = np.sort(
            np.random.default_rng(d.seed).choice(len(pool), d.corpus_limit, replace=False)
        )
    corpus_part = Part(pool.images, np.full(len(rows), -1, np.int64), index=rows)
    soft, teacher_val = _label_corpus(params, teacher_model, corpus_part, train, val)
    log.info(
        "distill: the teacher (%s) labelled %d corpus items (T=%g); its val accuracy %.4f",
        d.teacher,
        len(rows),
        d.temperature,
        teacher_val,
    )
    # The corpus with the teacher's soft targets, then the labelled items with their labels.
    items = module_of([replace(corpus_part, soft=soft), Part(train.images, train.labels)], train)
    objective = Distillation(temperature=d.temperature, hard_weight=d.hard_weight)
    model_cfg = d.model.model_dump() if d.model is not None else dict(tck["model_config"])
    if d.model is not None and is_text_data(train):
        model_cfg = text_model_config(model_cfg, train.transform)
    torch.manual_seed(d.seed)
    start = file_sha256(teacher / paths.MODEL_FILE)  # the teacher's weights
    if d.init == "pretrained":
        student = _pretrained_student(pretrained / paths.MODEL_FILE, shape, len(train.classes))
        start += file_sha256(pretrained / paths.MODEL_FILE)
    else:
        model_cfg.pop("init", None)  # the student starts from scratch, not from a checkpoint
        try:
            student = build_classifier(model_cfg, *input_dims(shape), len(train.classes))
        except ValueError as err:
            raise ArtifactError(f"distill.model: {err}") from None
    backbone = getattr(student, "backbone", student)
    if (
        d.propagate.rounds
        and d.propagate.features == "spatial"
        and not hasattr(backbone, "spatial")
    ):
        raise ArtifactError(  # said before training, not after
            f"distill.propagate.features: spatial: the {type(backbone).__name__} backbone has no "
            "spatial representation; set features: output"
        )
    manifest = read_manifest(data)
    fp = run_identity(
        params=d.model_dump(),
        data={
            **{s: v["sha256"] for s, v in manifest["splits"].items()},
            "corpus": read_manifest(corpus)["splits"]["train"]["sha256"],
        },
        start=start,
    )
    resume = checkpoints / "distill" / "last.pt"
    result = fit(
        student,
        items,
        val,
        d.train,
        seed=d.seed,
        resume_path=resume,
        fingerprint=fp,
        desc="student",
        objective=objective,
    )
    distilled_val_acc = result.best_val_acc
    history = list(result.history)
    if d.consistency.epochs:
        result = _consistency(params, student, corpus_part, train, val, checkpoints, fp)
        history += [{**r, "epoch": len(history) + r["epoch"]} for r in result.history]
    summary: dict[str, float] | None = None  # the last propagation round's
    for r in range(d.propagate.rounds):
        result, summary = _propagate_round(
            params, student, corpus_part, train, val, checkpoints, fp, r
        )
        history += [{**row, "epoch": len(history) + row["epoch"]} for row in result.history]
    if not distributed.is_main():  # under torchrun, rank 0 alone writes
        return {}
    n_student = sum(t.numel() for t in student.parameters())
    n_teacher = sum(t.numel() for t in teacher_model.parameters())
    metrics = {
        "val_acc": result.best_val_acc,
        "teacher": d.teacher,
        "teacher_val_acc": teacher_val,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "corpus_images": len(rows),
        "labelled_images": len(train),
        "student_params": n_student,
        "student_teacher_size": n_student / n_teacher,
    }
    if d.consistency.epochs:
        metrics["distilled_val_acc"] = distilled_val_acc
        metrics["consistency_epochs"] = d.consistency.epochs
    if summary is not None:
        metrics["propagate_rounds"] = d.propagate.rounds
        metrics["propagate_changed"] = summary["changed"]
        metrics["propagate_unreached"] = summary["unreached"]
    record_environment(checkpoints, "student", d.train.device)
    save_checkpoint(
        out / paths.MODEL_FILE,
        student,
        model_config=model_cfg,
        classes=train.classes,
        input_shape=shape,
        transform=train.transform,
        extra={
            "stage": "distill",
            "variant": "student",
            "strategy": "distill",
            "data_sha256": manifest["splits"]["train"]["sha256"],
            "metrics": metrics,
        },
    )
    write_history(reports / "history.csv", history)
    write_json(reports / "metrics.json", metrics)
    shutil.rmtree(resume.parent, ignore_errors=True)
    log.info("distill: student %s (%.0f items/s)", metrics, result.items_per_s)
    return {
        "metrics": metrics,
        "history": {"student": history},
        "artifacts": [reports / "history.csv"],
    }


def _label_corpus(
    params: Params, teacher: Classifier, corpus: Part, train: Dataset, val: Dataset
) -> tuple[np.ndarray, float]:
    """The corpus's soft targets at ``distill.temperature`` from ``distill.teacher``, and that
    teacher's accuracy on the validation split.

    ``nb_em`` and ``both`` fit naive Bayes with EM over the corpus texts (the token ids
    decoded); ``both`` multiplies its distribution by the fine-tuned model's and normalises
    (a product of experts: a class both find likely stays likely)."""
    d = params.distill
    if d.teacher != "finetuned" and not is_text_data(train):
        raise ArtifactError(
            f"distill.teacher: {d.teacher}: naive Bayes + EM reads words, and the task's data "
            "are images; use teacher: finetuned"
        )
    networks: list[np.ndarray] = []
    if d.teacher in ("finetuned", "both"):
        items = module_of([corpus], train)
        networks = [
            predict_proba(teacher, items, temperature=d.temperature),
            predict_proba(teacher, data_module(val)),
        ]
    if d.teacher == "finetuned":
        soft, val_p = networks
    else:

        def text(ids: np.ndarray, index: np.ndarray | None = None) -> list[str]:
            return nb_em.decode_texts(ids, train.transform, index)

        try:
            kw = nb_em.settings(d.nb_em, train.classes, d.seed)
        except ValueError as exc:
            raise ArtifactError(str(exc)) from None
        corpus_texts = text(corpus.items, corpus.index)
        model = nb_em.fit_nb_em(
            text(train.images), train.labels, corpus_texts, len(train.classes), **kw
        )
        soft = nb_em.nb_em_proba(model, corpus_texts, d.temperature)
        val_p = nb_em.nb_em_proba(model, text(val.images))
        if d.teacher == "both":
            soft, val_p = _product(soft, networks[0]), _product(val_p, networks[1])
    return soft, float(np.mean(val_p.argmax(1) == val.labels))


def _product(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The normalised product of two rows of class distributions."""
    r = np.maximum(p, 1e-12) * np.maximum(q, 1e-12)
    return r / r.sum(axis=1, keepdims=True)


def _pretrained_student(path: Path, shape: tuple[int, ...], num_classes: int) -> Classifier:
    """``distill.init: pretrained``: the pretrained backbone with a fresh head, as the teacher
    started, to learn from the teacher's soft targets on the corpus (self-training)."""
    base, ckpt = load_checkpoint(path)
    if tuple(ckpt["input_shape"]) != shape:
        raise ArtifactError(
            f"{path} expects inputs of shape {tuple(ckpt['input_shape'])}, the task data "
            f"has {shape}; run pretrain again (dvc repro)"
        )
    return Classifier(base.backbone, num_classes)


def _beside_labels(corpus: Part, labels: np.ndarray, train: Dataset, share: float) -> DataModule:
    """The corpus with ``labels`` (``-1``: unlabelled) beside the labelled set, repeated to
    make ``share`` of the items, so that each batch holds some; neither is copied."""
    repeat = max(1, math.ceil(share / (1 - share) * len(corpus) / len(train)))
    parts = [
        replace(corpus, labels=labels.astype(np.int64)),
        Part(train.images, train.labels, repeat=repeat),
    ]
    return module_of(parts, train)


def _consistency(
    params: Params,
    student: torch.nn.Module,
    pool: Part,
    train: Dataset,
    val: Dataset,
    checkpoints: Path,
    fp: dict[str, str],
) -> FitResult:
    """The distilled student goes on learning from the corpus by FixMatch-style consistency
    (``distill.consistency``); the labelled set is repeated to make ``labelled_share`` of the
    items, so that each batch holds some."""
    d, c = params.distill, params.distill.consistency
    items = _beside_labels(pool, np.full(len(pool), -1, np.int64), train, c.labelled_share)
    cfg = d.train.model_copy(
        update={
            "epochs": c.epochs,
            "lr": c.lr,
            "weight_decay": d.train.weight_decay if c.weight_decay is None else c.weight_decay,
            "schedule": "cosine",
            "patience": None,
            "augment": c.weak if c.weak is not None else d.train.augment,
            "ema": c.ema,
            "keep": c.keep,
        }
    )
    log.info(
        "distill: consistency over %d corpus images and %d labelled (x%d), %d epochs",
        len(pool),
        len(train),
        items.parts[1].repeat,
        c.epochs,
    )
    objective = Consistency(
        c.threshold,
        c.weight,
        c.strong.model_dump(),
        c.cutout,
        c.labelled.model_dump() if c.labelled is not None else None,
    )
    return fit(
        student,
        items,
        val,
        cfg,
        seed=d.seed + 1,
        resume_path=checkpoints / "distill" / "consistency.pt",
        fingerprint={**fp, "phase": "consistency"},
        desc="student (consistency)",
        objective=objective,
    )


def _propagate_round(
    params: Params,
    student: torch.nn.Module,
    pool: Part,
    train: Dataset,
    val: Dataset,
    checkpoints: Path,
    fp: dict[str, str],
    r: int,
) -> tuple[FitResult, dict[str, float]]:
    """One round of ``distill.propagate``: the labels spread over the k-NN graph of the
    student's features of the corpus and the labelled set, and the student trains on the
    class that reaches each corpus image (where none does, on its own prediction)."""
    d, p = params.distill, params.distill.propagate
    both = module_of([pool, Part(train.images, train.labels)], train)
    backbone = getattr(student, "backbone", student)
    feats = features(backbone, both, spatial=p.features == "spatial").cpu().numpy()
    feats = reduce_features(feats, p.pca, d.seed)
    seeds = np.concatenate([np.full(len(pool), -1), train.labels])
    dist = propagate_labels(feats, seeds, len(train.classes), p.neighbours, p.alpha)[: len(pool)]
    own = predict_proba(student, module_of([pool], train)).argmax(1)
    reached = dist.sum(1) > 0
    labels = np.where(reached, dist.argmax(1), own)
    summary = {"changed": float(np.mean(labels != own)), "unreached": float(np.mean(~reached))}
    log.info(
        "distill: propagation round %d/%d: the labels spread over %d images (%s features, %d "
        "dims); %.2f %% of the corpus changed class against the student's own prediction, "
        "%.2f %% out of reach",
        r + 1,
        p.rounds,
        len(both),
        p.features,
        feats.shape[1],
        100 * summary["changed"],
        100 * summary["unreached"],
    )
    items = _beside_labels(pool, labels, train, p.labelled_share)
    cfg = d.train.model_copy(
        update={
            "epochs": p.epochs,
            "lr": p.lr,
            "weight_decay": p.weight_decay,
            "schedule": "cosine",
            "patience": None,
            "augment": p.augment if p.augment is not None else d.train.augment,
            "ema": None,
            "keep": "last",
        }
    )
    result = fit(
        student,
        items,
        val,
        cfg,
        seed=d.seed + 2 + r,
        resume_path=checkpoints / "distill" / f"propagate-{r}.pt",
        fingerprint={**fp, "phase": f"propagate-{r}"},
        desc=f"student (propagation {r + 1}/{p.rounds})",
    )
    return result, summary


if __name__ == "__main__":
    sys.exit(stage_main("distill", run))
