"""Stage ``preprocess``: load, validate and split the pretraining corpus and the task set."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from graftline import layout as paths
from graftline.config import Params, PreprocessParams
from graftline.data.dataset import Dataset
from graftline.data.sources import load_source
from graftline.data.splits import label_budget, stratified_split
from graftline.data.store import save_splits
from graftline.data.text import (
    checkpoint_token_spec,
    token_spec,
    tokenize_dataset,
    train_tokenizer,
)
from graftline.data.validate import restrict_classes, validate
from graftline.hub import inspect_checkpoint, load_tokenizer
from tasks._stage import stage_main

log = logging.getLogger("graftline.preprocess")


def prepare(p: PreprocessParams) -> tuple[dict[str, Dataset], dict[str, Dataset], dict[str, Any]]:
    """Load and validate both datasets and split them; nothing is written here."""
    size, ch = p.image_size, p.channels
    pre, pre_test = load_source(p.pretrain.source, size, ch)
    pre_name = f"pretrain data ({pre.source})"
    validate(pre, pre_name)
    if p.pretrain.limit and p.pretrain.limit < len(pre):
        pre = stratified_split(
            pre,
            {"rest": 1 - p.pretrain.limit / len(pre), "keep": p.pretrain.limit / len(pre)},
            p.seed,
            pre_name,
        )["keep"]
    pre_splits = stratified_split(
        pre,
        {"train": 1 - p.pretrain.val_fraction, "val": p.pretrain.val_fraction},
        p.seed,
        pre_name,
    )
    if pre_test is not None and pre.labelled:
        validate(pre_test, f"pretrain test data ({pre_test.source})")
        pre_splits["test"] = restrict_classes(
            pre_test, pre.classes, f"pretrain test data ({pre_test.source})"
        )

    task, task_test = load_source(p.task.source, size, ch)
    task_name = f"task data ({task.source})"
    if p.task.classes:
        task = restrict_classes(task, p.task.classes, task_name)
    validate(task, task_name)
    t = p.task
    if task_test is not None:
        task_test = restrict_classes(
            task_test, task.classes, f"task test data ({task_test.source})"
        )
        validate(task_test, f"task test data ({task_test.source})")
        splits = stratified_split(
            task, {"train": 1 - t.val_fraction, "val": t.val_fraction}, p.seed, task_name
        )
        splits["test"] = task_test
    else:
        splits = stratified_split(
            task,
            {
                "train": 1 - t.val_fraction - t.test_fraction,
                "val": t.val_fraction,
                "test": t.test_fraction,
            },
            p.seed,
            task_name,
        )
    full_train = len(splits["train"])
    splits["train"] = label_budget(splits["train"], t.labels_per_class, p.seed)
    info: dict[str, Any] = {
        "labels_per_class": t.labels_per_class,
        "train_before_budget": full_train,
    }
    if not pre.labelled:
        # The k-NN monitor of pretraining needs labels: a corpus without them is monitored
        # on the task's labelled train (the bank, within the label budget) and val splits,
        # copied beside it so that the pretrain stage depends on its own data only.
        log.info("pretrain: the corpus has no labels; its k-NN monitor uses the task's splits")
        pre_splits[paths.PROBE_BANK] = splits["train"]
        pre_splits[paths.PROBE_QUERY] = splits["val"]
    if p.text:
        info["tokenizer"] = tokenize(p, {"pretrain": pre_splits, "task": splits})
    return pre_splits, splits, info


def tokenize(p: PreprocessParams, groups: dict[str, dict[str, Dataset]]) -> dict[str, Any]:
    """Train the tokenizer on the corpus's training split (``groups["pretrain"]["train"]``),
    or take the pretrained checkpoint's (``preprocess.tokenizer.path``),
    and turn every split's texts into token ids, in place; returns what the manifests
    record."""
    corpus = groups["pretrain"]["train"]
    if p.tokenizer.path is not None:  # a pretrained checkpoint's: its model reads its ids
        ckpt = inspect_checkpoint(p.tokenizer.path)
        tok, spec = checkpoint_token_spec(
            load_tokenizer(ckpt.path), p.tokenizer, ckpt.config.get("max_position_embeddings")
        )
        spec["tokenizer_from_sha256"] = ckpt.sha256
        made = f"{spec['tokenizer_kind']} from {ckpt.path}"
    else:
        tok = train_tokenizer(corpus.images, p.tokenizer)
        spec = token_spec(tok, p.tokenizer, 0)
        made = f"byte-level BPE trained on {len(corpus)} texts"
    truncated = {}
    for group_name, group in groups.items():
        for name, ds in group.items():
            group[name], truncated[f"{group_name}.{name}"] = tokenize_dataset(ds, tok, spec)
    # the corpus's size in tokens, counted on its ids (not encoded a second time)
    spec["corpus_tokens"] = int((groups["pretrain"]["train"].images != spec["pad_id"]).sum())
    for group in groups.values():
        for ds in group.values():
            ds.transform["corpus_tokens"] = spec["corpus_tokens"]
    log.info(
        "tokenizer: %s, %d tokens; the corpus: %d tokens; texts over max_len %d, truncated: %s",
        made,
        spec["vocab_size"],
        spec["corpus_tokens"],
        p.tokenizer.max_len,
        ", ".join(f"{k}={v}" for k, v in truncated.items()),
    )
    return {
        "vocab_size": spec["vocab_size"],
        "corpus_tokens": spec["corpus_tokens"],
        "sha256": spec["tokenizer_sha256"],
        "truncated": truncated,
    }


def run(params: Params, out: Path = paths.PROCESSED) -> dict[str, Any]:
    """Load, validate and split the pretraining corpus and the task set."""
    p = params.preprocess
    pre_splits, task_splits, info = prepare(p)
    # Each manifest records its dataset's input transform (graftline.data.transforms), which
    # the models trained on it carry on to serving.
    common: dict[str, Any] = {"seed": p.seed}
    if "tokenizer" in info:
        common["tokenizer"] = info["tokenizer"]
    m_pre = save_splits(out / "pretrain", pre_splits, {**common, "params": p.pretrain.model_dump()})
    m_task = save_splits(
        out / "task", task_splits, {**common, **info, "params": p.task.model_dump()}, texts=True
    )
    for name, m in (("pretrain", m_pre), ("task", m_task)):
        counts = ", ".join(f"{s}={v['count']}" for s, v in m["splits"].items())
        what = "tokens" if p.text else "shape"
        log.info("%s: %s (%s classes, %s %s)", name, counts, len(m["classes"]), what, m["shape"])
    return {
        "metrics": {
            f"{name}.{split}_count": v["count"]
            for name, m in (("pretrain", m_pre), ("task", m_task))
            for split, v in m["splits"].items()
        },
        "artifacts": [out / "pretrain" / "manifest.json", out / "task" / "manifest.json"],
        "manifests": {"pretrain": m_pre, "task": m_task},
    }


if __name__ == "__main__":
    sys.exit(stage_main("preprocess", run))
