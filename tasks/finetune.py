"""Stage ``finetune``: graft a new task head onto the pretrained backbone and train it;
train the same architecture from scratch on the same labels as the baseline."""

from __future__ import annotations

import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graftline import distributed, nb_em
from graftline import layout as paths
from graftline.config import FinetuneParams, Params
from graftline.data.dataset import Dataset
from graftline.data.modules import data_module
from graftline.data.store import load_split, read_manifest
from graftline.errors import ArtifactError
from graftline.io import file_sha256, write_json
from graftline.models import Classifier, build_classifier, save_checkpoint
from graftline.models.checkpoint import load_checkpoint
from graftline.models.classifier import input_dims
from graftline.models.lora import adapter_layers, add_adapters, merge_adapters
from graftline.train import ParamGroup, fit, predict_proba
from tasks._stage import stage_main
from tasks._training import record_environment, run_identity, write_history

log = logging.getLogger("graftline.finetune")


def graft(pretrained: Classifier, num_classes: int) -> Classifier:
    """The pretrained backbone with a fresh head for ``num_classes`` classes."""
    return Classifier(pretrained.backbone, num_classes)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def strategy_groups(model: Classifier, p: FinetuneParams) -> list[ParamGroup]:
    """Parameter groups for ``full``, ``linear_probe``, ``gradual`` or ``lora`` fine-tuning,
    with layer-wise LR decay over a layered backbone (the ViT) when ``layer_decay`` is set.

    ``lora`` puts ``peft``'s adapters on ``model``'s backbone (``model.backbone`` becomes
    the ``LoraModel`` around it) and freezes the rest of it: the adapters (and the norms, if
    asked) train at the head's LR.
    """
    head = ParamGroup("head", model.head)
    if p.strategy == "lora":
        cfg = p.lora
        model.backbone.requires_grad_(False)
        try:
            model.backbone = add_adapters(
                model.backbone, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout
            )
        except ValueError as err:
            raise ArtifactError(f"finetune.strategy lora: {err}") from None
        layers = adapter_layers(model.backbone)
        parts: list[nn.Module] = [m for layer in layers for m in (layer.lora_A, layer.lora_B)]
        if cfg.train_norms:  # LayerNorms, and the RMSNorms of a Llama-style decoder
            parts += [m for m in model.backbone.modules() if _is_norm(m)]
        return [ParamGroup("adapters", nn.ModuleList(parts)), head]
    if p.strategy == "linear_probe":
        return [ParamGroup("backbone", model.backbone, frozen_epochs=math.inf), head]
    frozen = p.head_epochs if p.strategy == "gradual" else 0
    if p.layer_decay is None:
        return [ParamGroup("backbone", model.backbone, p.backbone_lr_scale, frozen), head]
    layers = getattr(model.backbone, "layers", None)
    if layers is None:
        raise ArtifactError(
            "finetune.layer_decay needs a backbone made of layers (arch vit, llama or bert); "
            f"the pretrained backbone is {type(model.backbone).__name__}"
        )
    stack = layers()
    return [
        ParamGroup(
            f"backbone.layer{i}",
            module,
            p.backbone_lr_scale * p.layer_decay ** (len(stack) - 1 - i),
            frozen,
        )
        for i, module in enumerate(stack)
    ] + [head]


def trainable_share(model: nn.Module, groups: list[ParamGroup] | None) -> dict[str, float]:
    """How many of the model's parameters train (a part frozen throughout does not)."""
    total = sum(t.numel() for t in model.parameters())
    if groups is None:
        trained = total
    else:
        trained = sum(
            t.numel()
            for g in groups
            if not math.isinf(g.frozen_epochs)
            for t in g.module.parameters()
        )
    return {"trainable_params": trained, "trainable_fraction": trained / total}


def word_model(p: FinetuneParams, train: Dataset, corpus: Path) -> nb_em.NaiveBayesEM:
    """``finetune.nb_em``: naive Bayes + EM on the labelled texts and the corpus's (the token
    ids decoded, so that it reads what serving's truncated texts give back)."""
    if train.transform.get("kind") != "text":
        raise ArtifactError("finetune.nb_em reads words, and the task's data are images")
    try:
        kw = nb_em.settings(p.nb_em, train.classes, p.seed)
    except ValueError as exc:
        raise ArtifactError(f"finetune.nb_em: {exc}") from None
    pool = load_split(corpus, "train", mmap=True)
    if pool.transform.get("tokenizer_sha256") != train.transform.get("tokenizer_sha256"):
        raise ArtifactError(f"{corpus}: the corpus was tokenized otherwise than the task data")
    texts = nb_em.decode_texts(train.images, train.transform)
    corpus_texts = nb_em.decode_texts(pool.images, pool.transform)
    return nb_em.fit_nb_em(texts, train.labels, corpus_texts, len(train.classes), **kw)


def calibrated_word_model(
    p: FinetuneParams, train: Dataset, val: Dataset, network: np.ndarray, corpus: Path
) -> nb_em.NaiveBayesEM:
    """:func:`word_model`, with the temperature that calibrates its product with the
    network's ``network`` probabilities of ``val`` (fitted on ``val``'s labels: the product
    of two models that each count the same evidence is overconfident)."""
    words = word_model(p, train, corpus)
    score = np.log(np.maximum(network.astype(np.float64), 1e-30))
    score = score + words.predict_log_proba(nb_em.decode_texts(val.images, val.transform))
    words.temperature = nb_em.fit_temperature(score, val.labels)
    return words


def run(
    params: Params,
    data: Path = paths.TASK_DATA,
    pretrained: Path = paths.PRETRAINED,
    finetuned_out: Path = paths.FINETUNED,
    scratch_out: Path = paths.SCRATCH,
    reports: Path = paths.FINETUNE_REPORT,
    checkpoints: Path = paths.CHECKPOINTS,
    corpus: Path = paths.PRETRAIN_DATA,
) -> dict[str, Any]:
    """Fine-tune the pretrained backbone with a new task head, and train the scratch baseline;
    with ``finetune.nb_em`` the fine-tuned model carries naive Bayes + EM over the corpus."""
    p = params.finetune
    manifest = read_manifest(data)
    train, val = load_split(data, "train"), load_split(data, "val")
    shape = tuple(train.images.shape[1:])
    base, ckpt = load_checkpoint(pretrained / paths.MODEL_FILE)
    if tuple(ckpt["input_shape"]) != shape:
        raise ArtifactError(
            f"{pretrained / paths.MODEL_FILE} expects inputs of shape {tuple(ckpt['input_shape'])}, "
            f"the task data in {data} has {shape}; set preprocess.image_size/channels (images) "
            "or preprocess.tokenizer.max_len (text) to match"
        )
    tokenizer = ckpt.get("transform", {}).get("tokenizer_sha256")
    if tokenizer != train.transform.get("tokenizer_sha256"):
        raise ArtifactError(
            f"{pretrained / paths.MODEL_FILE} was pretrained on another tokenizer's ids "
            f"({str(tokenizer)[:12]}) than the task data in {data} "
            f"({str(train.transform.get('tokenizer_sha256'))[:12]}); run preprocess and "
            "pretrain again (dvc repro)"
        )
    model_cfg = ckpt["model_config"]
    # A resume must continue on the same backbone: its weights' hash is part of the run's id.
    backbone_sha256 = file_sha256(pretrained / paths.MODEL_FILE)
    data_ids = {s: v["sha256"] for s, v in manifest["splits"].items()}
    results: dict[str, Any] = {}
    for name, out in (("finetuned", finetuned_out), ("scratch", scratch_out)):
        torch.manual_seed(p.seed)  # the new head's initial weights are part of the run's seed
        if name == "finetuned":
            model = graft(base, len(train.classes))
            groups = strategy_groups(model, p)
            cfg = p.train
        else:
            model = build_classifier(model_cfg, *input_dims(shape), len(train.classes))
            groups = None
            cfg = p.scratch or p.train
        resume = checkpoints / "finetune" / name / "last.pt"
        fp = run_identity(params=(name, p.model_dump()), data=data_ids, start=backbone_sha256)
        result = fit(
            model,
            train,
            val,
            cfg,
            seed=p.seed,
            groups=groups,
            resume_path=resume,
            fingerprint=fp,
            desc=name,
        )
        metrics = {
            "val_acc": result.best_val_acc,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            **trainable_share(model, groups),
        }
        if merge_adapters(model):  # lora: the exported model is a plain one
            log.info("%s: adapters merged into the weights", name)
        if not distributed.is_main():  # under torchrun, rank 0 alone writes
            continue
        if name == "finetuned" and p.nb_em.enabled:
            network = predict_proba(model, data_module(val))
            model.words = calibrated_word_model(p, train, val, network, corpus)
            proba = predict_proba(model, data_module(val))
            metrics["val_acc_network"] = metrics["val_acc"]
            metrics["val_acc"] = float((proba.argmax(1) == val.labels).mean())
            metrics["nb_em_words"] = model.words.size
            metrics["nb_em_temperature"] = model.words.temperature
            log.info(
                "%s: x naive Bayes + EM (%d words, calibrated at temperature %.2f): "
                "val_acc %.4f (the network alone %.4f)",
                name,
                metrics["nb_em_words"],
                model.words.temperature,
                metrics["val_acc"],
                metrics["val_acc_network"],
            )
        record_environment(checkpoints, name, cfg.device)
        save_checkpoint(
            out / paths.MODEL_FILE,
            model,
            # the scratch baseline did not start from a pretrained checkpoint
            model_config=model_cfg
            if name == "finetuned"
            else {k: v for k, v in model_cfg.items() if k != "init"},
            classes=train.classes,
            input_shape=shape,
            transform=train.transform,
            extra={
                "stage": "finetune",
                "variant": name,
                "strategy": p.strategy if name == "finetuned" else "scratch",
                "data_sha256": manifest["splits"]["train"]["sha256"],
                "metrics": metrics,
            },
        )
        write_history(reports / f"{name}_history.csv", result.history)
        shutil.rmtree(resume.parent, ignore_errors=True)
        log.info("%s: %s (%.0f items/s)", name, metrics, result.items_per_s)
        results[name] = {"metrics": metrics, "history": result.history}
    if not distributed.is_main():
        return {}
    write_json(reports / "metrics.json", {k: v["metrics"] for k, v in results.items()})
    return {
        "metrics": {k: v["metrics"] for k, v in results.items()},
        "history": {k: v["history"] for k, v in results.items()},
        "artifacts": [reports / f"{k}_history.csv" for k in results],
    }


if __name__ == "__main__":
    sys.exit(stage_main("finetune", run))
