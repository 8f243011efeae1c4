"""Stage ``pretrain``: train backbone + pretraining head from scratch on the corpus."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graftline import distributed
from graftline import layout as paths
from graftline.config import Params
from graftline.data.store import load_split, read_manifest
from graftline.errors import DataError
from graftline.io import write_json
from graftline.models import build_classifier, save_checkpoint
from graftline.objectives import Contrastive, MaskedAutoencoder
from graftline.train import fit, predict_proba
from tasks._stage import stage_main
from tasks._training import record_environment, run_identity, write_history

log = logging.getLogger("graftline.pretrain")


def run(
    params: Params,
    data: Path = paths.PRETRAIN_DATA,
    out: Path = paths.PRETRAINED,
    reports: Path = paths.PRETRAIN_REPORT,
    checkpoints: Path = paths.CHECKPOINTS,
) -> dict[str, Any]:
    """Train backbone + pretraining head from scratch on the pretraining corpus."""
    p = params.pretrain
    manifest = read_manifest(data)
    # The corpus stays on disk, memory-mapped: fit reads it a batch at a time.
    train, val = load_split(data, "train", mmap=True), load_split(data, "val")
    probe = None
    if not train.labelled:
        if p.objective == "supervised":
            raise DataError(
                f"pretrain.objective: supervised needs labels, and the pretraining corpus "
                f"({train.source}) has none; use objective mae (arch vit) or contrastive"
            )
        probe = (load_split(data, paths.PROBE_BANK), load_split(data, paths.PROBE_QUERY))
    c, h, _ = train.images.shape[1:]
    model_cfg = p.model.model_dump()
    torch.manual_seed(p.seed)  # the initial weights are part of the run's seed
    model = build_classifier(model_cfg, c, h, len(train.classes))
    objective: MaskedAutoencoder | Contrastive | None = None
    if p.objective == "mae":
        objective = MaskedAutoencoder(model.backbone, c, **p.mae.model_dump())
    elif p.objective == "contrastive":
        cc = p.contrastive
        objective = Contrastive(
            model.backbone.out_features,
            proj_dim=cc.proj_dim,
            temperature=cc.temperature,
            augment=cc.augment.model_dump(),
            knn_k=cc.knn_k,
        )
    fp = run_identity(
        params=p.model_dump(), data={s: v["sha256"] for s, v in manifest["splits"].items()}
    )
    resume = checkpoints / "pretrain" / "last.pt"
    result = fit(
        model,
        train,
        val,
        p.train,
        seed=p.seed,
        resume_path=resume,
        fingerprint=fp,
        desc="pretrain",
        objective=objective,
        probe=probe,
    )
    metrics: dict[str, Any] = {
        # supervised: the classifier's validation accuracy; mae: the features' k-NN accuracy
        "val_knn_acc" if objective is not None else "val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
    }
    if not distributed.is_main():  # under torchrun, rank 0 alone evaluates and writes
        return {}
    if "test" in manifest["splits"] and objective is None:  # an MAE's head never trained
        test = load_split(data, "test")
        pred = predict_proba(model, test.images).argmax(1)
        metrics["test_acc"] = float(np.mean(pred == test.labels))
    record_environment(checkpoints, "pretrained", p.train.device)
    save_checkpoint(
        out / paths.MODEL_FILE,
        model,
        model_config=model_cfg,
        classes=train.classes,
        input_shape=(c, h, h),
        transform=train.transform,
        extra={
            "stage": "pretrain",
            "objective": p.objective,
            "data_sha256": manifest["splits"]["train"]["sha256"],
            "metrics": metrics,
        },
    )
    write_history(reports / "history.csv", result.history)
    write_json(reports / "metrics.json", metrics)
    shutil.rmtree(resume.parent, ignore_errors=True)
    log.info("pretrain: %s (%.0f images/s)", metrics, result.images_per_s)
    return {
        "metrics": {**metrics, "images_per_s": result.images_per_s},
        "history": {"": result.history},
        "artifacts": [reports / "history.csv"],
        "images_per_s": result.images_per_s,
    }


if __name__ == "__main__":
    sys.exit(stage_main("pretrain", run))
