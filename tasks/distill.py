"""Stage ``distill``: the fine-tuned model labels the pretraining corpus with soft targets, and a
student trains on them plus the labelled set (the third step of "pretrain, fine-tune, distil").

Off by default (``distill.enabled: false``): the stage then writes a note in place of the
student, and the fine-tuned model is the one that deploys.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graftline import distributed
from graftline.config import Params
from graftline.data.dataset import Dataset
from graftline.data.store import load_split, read_manifest
from graftline.errors import ArtifactError
from graftline.io import write_json, write_text
from graftline.models import build_classifier, save_checkpoint
from graftline.models.checkpoint import load_checkpoint
from graftline.objectives import Consistency, Distillation
from graftline.train import FitResult, fit, predict_proba
from tasks import paths
from tasks._stage import stage_main
from tasks._training import fingerprint, write_history

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
    pool = load_split(corpus, "train")
    train, val = load_split(data, "train"), load_split(data, "val")
    shape = tuple(train.images.shape[1:])
    if tuple(pool.images.shape[1:]) != shape:
        raise ArtifactError(
            f"{corpus}: corpus images are {tuple(pool.images.shape[1:])}, the task's {shape}; "
            "the teacher can only label images of its own input shape"
        )
    if d.corpus_limit and d.corpus_limit < len(pool):
        keep = np.random.default_rng(d.seed).choice(len(pool), d.corpus_limit, replace=False)
        pool = pool.subset(np.sort(keep))
    soft = predict_proba(teacher_model, pool.images, temperature=d.temperature)
    teacher_val = float(np.mean(predict_proba(teacher_model, val.images).argmax(1) == val.labels))
    log.info(
        "distill: the teacher labelled %d corpus images (T=%g); its val accuracy %.4f",
        len(pool),
        d.temperature,
        teacher_val,
    )
    # One training set: the corpus (soft targets) then the labelled items (hard labels); a
    # label is the item's index into those tables (graftline.objectives.Distillation).
    items = Dataset(
        np.concatenate([pool.images, train.images]),
        np.arange(len(pool) + len(train), dtype=np.int64),
        train.classes,
        f"{pool.source} + {train.source}",
        [*pool.ids, *train.ids],
        train.transform,
    )
    objective = Distillation(
        torch.from_numpy(soft),
        torch.from_numpy(train.labels),
        temperature=d.temperature,
        hard_weight=d.hard_weight,
    )
    model_cfg = d.model.model_dump() if d.model is not None else dict(tck["model_config"])
    torch.manual_seed(d.seed)
    try:
        student = build_classifier(model_cfg, shape[0], shape[1], len(train.classes))
    except ValueError as err:
        raise ArtifactError(f"distill.model: {err}") from None
    manifest = read_manifest(data)
    fp = fingerprint(
        d.model_dump(),
        {s: v["sha256"] for s, v in manifest["splits"].items()},
        read_manifest(corpus)["splits"]["train"]["sha256"],
        tck.get("metrics"),
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
        result = _consistency(params, student, pool, train, val, checkpoints, fp)
        history += [{**r, "epoch": len(history) + r["epoch"]} for r in result.history]
    if not distributed.is_main():  # under torchrun, rank 0 alone writes
        return {}
    n_student = sum(t.numel() for t in student.parameters())
    n_teacher = sum(t.numel() for t in teacher_model.parameters())
    metrics = {
        "val_acc": result.best_val_acc,
        "teacher_val_acc": teacher_val,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "corpus_images": len(pool),
        "labelled_images": len(train),
        "student_params": n_student,
        "student_teacher_size": n_student / n_teacher,
    }
    if d.consistency.epochs:
        metrics["distilled_val_acc"] = distilled_val_acc
        metrics["consistency_epochs"] = d.consistency.epochs
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
    log.info("distill: student %s (%.0f images/s)", metrics, result.images_per_s)
    return {
        "metrics": metrics,
        "history": {"student": history},
        "artifacts": [reports / "history.csv"],
    }


def _consistency(
    params: Params,
    student: torch.nn.Module,
    pool: Dataset,
    train: Dataset,
    val: Dataset,
    checkpoints: Path,
    fp: str,
) -> FitResult:
    """The distilled student goes on learning from the corpus by FixMatch-style consistency
    (``distill.consistency``); the labelled set is repeated to make ``labelled_share`` of the
    items, so that each batch holds some."""
    d, c = params.distill, params.distill.consistency
    repeat = max(1, math.ceil(c.labelled_share / (1 - c.labelled_share) * len(pool) / len(train)))
    items = Dataset(
        np.concatenate([pool.images, *[train.images] * repeat]),
        np.concatenate([np.full(len(pool), -1, np.int64), np.tile(train.labels, repeat)]),
        train.classes,
        f"{pool.source} + {train.source} x{repeat}",
        transform=train.transform,
    )
    cfg = d.train.model_copy(
        update={
            "epochs": c.epochs,
            "lr": c.lr,
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
        repeat,
        c.epochs,
    )
    objective = Consistency(c.threshold, c.weight, c.strong.model_dump(), c.cutout)
    return fit(
        student,
        items,
        val,
        cfg,
        seed=d.seed + 1,
        resume_path=checkpoints / "distill" / "consistency.pt",
        fingerprint=fingerprint(fp, "consistency"),
        desc="student (consistency)",
        objective=objective,
    )


if __name__ == "__main__":
    sys.exit(stage_main("distill", run))
