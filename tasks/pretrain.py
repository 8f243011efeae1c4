"""Stage ``pretrain``: train backbone + pretraining head from scratch on the corpus, or
start from a pretrained Hugging Face checkpoint (``pretrain.init``): check it, record its
hash and hand it on as a graftline backbone."""

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
from graftline.data.modules import data_module
from graftline.data.store import load_split, read_manifest
from graftline.data.text import is_text_data
from graftline.errors import ArtifactError, DataError
from graftline.export import HF_DIR, export_huggingface_backbone
from graftline.hub import DEFAULT_POOL, config_dict, inspect_checkpoint, load_base_model
from graftline.io import write_json, write_text
from graftline.models import build_classifier, save_checkpoint
from graftline.models.classifier import Classifier, input_dims
from graftline.models.text import FROM_TOKENIZER, TextBackbone, text_model_config
from graftline.objectives import CausalLM, Contrastive, MaskedAutoencoder, MaskedLM
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
    """Train backbone + pretraining head from scratch on the pretraining corpus (or take a
    pretrained checkpoint's: :func:`from_checkpoint`)."""
    p = params.pretrain
    if p.init is not None:
        return from_checkpoint(params, data, out, reports)
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
    shape = tuple(int(n) for n in train.images.shape[1:])  # (C, H, W), or (max_len,)
    c, h = input_dims(shape)
    model_cfg = p.model.model_dump()
    if is_text_data(train):  # the vocabulary, length and special ids: the tokenizer's
        model_cfg = text_model_config(model_cfg, train.transform)
    torch.manual_seed(p.seed)  # the initial weights are part of the run's seed
    model = build_classifier(model_cfg, c, h, len(train.classes))
    objective: MaskedAutoencoder | Contrastive | CausalLM | MaskedLM | None = None
    if p.objective in ("causal_lm", "mlm") and not is_text_data(train):
        raise DataError(f"pretrain.objective {p.objective} needs text; the corpus is images")
    if p.objective == "causal_lm":
        objective = CausalLM(model_cfg["vocab_size"], knn_k=p.lm.knn_k)
    elif p.objective == "mlm":
        t = train.transform
        objective = MaskedLM(
            model_cfg["vocab_size"],
            mask_id=t["mask_id"],
            special_ids=[t["pad_id"], t["bos_id"], t["eos_id"], t["mask_id"]],
            mask_rate=p.lm.mask_rate,
            knn_k=p.lm.knn_k,
        )
    elif p.objective == "mae":
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
    best = result.history[result.best_epoch - 1] if result.history else {}
    if "val_perplexity" in best:  # a language model's, at the epoch kept
        metrics["val_perplexity"] = best["val_perplexity"]
    if not distributed.is_main():  # under torchrun, rank 0 alone evaluates and writes
        return {}
    if "test" in manifest["splits"] and objective is None:  # an MAE's head never trained
        test = load_split(data, "test")
        pred = predict_proba(model, data_module(test)).argmax(1)
        metrics["test_acc"] = float(np.mean(pred == test.labels))
    record_environment(checkpoints, "pretrained", p.train.device)
    save_checkpoint(
        out / paths.MODEL_FILE,
        model,
        model_config=model_cfg,
        classes=train.classes,
        input_shape=shape,
        transform=train.transform,
        extra={
            "stage": "pretrain",
            "objective": p.objective,
            "data_sha256": manifest["splits"]["train"]["sha256"],
            "metrics": metrics,
        },
    )
    if is_text_data(train):  # for any Hugging Face tool: AutoModel + AutoTokenizer
        export_huggingface_backbone(
            model.backbone, train.transform, out / HF_DIR, np.asarray(val.images[:64])
        )
    write_history(reports / "history.csv", result.history)
    write_json(reports / "metrics.json", metrics)
    shutil.rmtree(resume.parent, ignore_errors=True)
    log.info("pretrain: %s (%.0f items/s)", metrics, result.items_per_s)
    return {
        "metrics": {**metrics, "images_per_s": result.images_per_s},
        "history": {"": result.history},
        "artifacts": [reports / "history.csv"],
        "images_per_s": result.images_per_s,
    }


def from_checkpoint(
    params: Params,
    data: Path = paths.PRETRAIN_DATA,
    out: Path = paths.PRETRAINED,
    reports: Path = paths.PRETRAIN_REPORT,
) -> dict[str, Any]:
    """``pretrain.init``: a pretrained Hugging Face checkpoint instead of pretraining. It is
    checked (``graftline.hub``: no code of its own, no unsafe pickle, a known model type, the
    tokenizer that preprocess used), loaded offline and written as graftline's pretrained
    backbone, its config and hash in the checkpoint's model config (``init``), so finetune,
    the card and the lineage tags name it."""
    init = params.pretrain.init
    assert init is not None
    hub = inspect_checkpoint(init.path)
    manifest = read_manifest(data)
    val = load_split(data, "val")
    spec = val.transform
    if spec.get("tokenizer_from") != init.path or spec.get("tokenizer_from_sha256") != hub.sha256:
        raise DataError(
            f"{data}: its token ids are not {init.path}'s tokenizer's (of this checkpoint, "
            f"sha256 {hub.sha256[:12]}); set preprocess.tokenizer.path: {init.path} and run "
            "preprocess again (dvc repro)"
        )
    pool = init.pool or DEFAULT_POOL[hub.kind]
    torch.manual_seed(params.pretrain.seed)  # weights the checkpoint lacks (a pooler) start here
    base = load_base_model(hub, pool)
    if int(base.config.vocab_size) < int(spec["vocab_size"]):
        raise ArtifactError(
            f"{init.path}: the model has {base.config.vocab_size} token embeddings and its "
            f"tokenizer {spec['vocab_size']} tokens"
        )
    model = Classifier(TextBackbone(hub.model_type, base, int(spec["pad_id"]), pool), 0)
    model_cfg = {
        "arch": hub.model_type,
        "pool": pool,
        "hf_config": config_dict(base),
        **{k: spec[k] for k in FROM_TOKENIZER},
        "init": hub.record(),
    }
    shape = tuple(int(n) for n in val.images.shape[1:])
    metrics: dict[str, Any] = {
        "parameters": sum(t.numel() for t in model.parameters()),
        "epochs_run": 0,
    }
    save_checkpoint(
        out / paths.MODEL_FILE,
        model,
        model_config=model_cfg,
        classes=[],
        input_shape=shape,
        transform=spec,
        extra={
            "stage": "pretrain",
            "objective": "huggingface",
            "data_sha256": manifest["splits"]["train"]["sha256"],
            "metrics": metrics,
        },
    )
    export_huggingface_backbone(model.backbone, spec, out / HF_DIR, np.asarray(val.images[:64]))
    write_text(reports / "history.csv", "epoch,train_loss,val_loss,val_acc\n")  # no epoch ran
    write_json(reports / "metrics.json", metrics)
    log.info(
        "pretrain: nothing trained; %s (%s, sha256 %s, %s weights, pool %s), %d parameters",
        init.path,
        hub.model_type,
        hub.sha256[:12],
        hub.weights,
        pool,
        metrics["parameters"],
    )
    return {"metrics": metrics, "history": {"": []}, "artifacts": [reports / "history.csv"]}


if __name__ == "__main__":
    sys.exit(stage_main("pretrain", run))
