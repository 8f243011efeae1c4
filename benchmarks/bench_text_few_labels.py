"""Fine-food reviews with few labels: TF-IDF + LR, naive Bayes + EM over the corpus (Nigam et
al., 2000), the Transformer from scratch, pretrained + fine-tuned (full, LoRA), + distil (a
student from scratch) and + self-training (a student from the pretrained backbone,
``distill.init: pretrained``) with the fine-tuned model, naive Bayes + EM or both labelling
the corpus (``distill.teacher``), and ``ensemble``: the fine-tuned network (``full``) and
naive Bayes + EM multiplied (what the preset serves: ``finetune.nb_em``), per label
budget; and the LM's pretraining speed.
Naive Bayes + EM models "other" (one to four stars) with four mixture components in the
``nb_em`` and ``ensemble`` routes (``--nb-components``: 0.748 against 0.740 with one); the
students' teacher keeps the preset's one a class (their students scored 1.4 points lower
with four).

    .venv/bin/python benchmarks/bench_text_few_labels.py [--budgets 10 50 100 all]
        [--draws 0 1 2] [--routes tfidf nb_em scratch full lora distil self em_self both_self
         ensemble]
        [--quick]

The preset ``params/text-reviews.yaml`` is the setting: a tokenizer and a Llama-style decoder
pretrained (next token) once on the 3,993 training reviews with their labels thrown away;
then, for each label budget (per class) and each draw (the seed of the balanced label draw
from the same reviews), every route trains on exactly those labels. No other label is seen:
fine-tuning keeps its last epoch (``keep: last``) and validates on its own labelled items,
so no epoch is chosen on held-out labels. The test set is the 1,000 testing reviews (the
majority class alone is 0.658: macro-F1 is printed beside accuracy).

It runs the pipeline's own stage functions (``tasks.preprocess``, ``tasks.pretrain``,
``tasks.finetune``, ``tasks.distill``, params checked by ``graftline.config``) in a temporary
folder, so the figures are the pipeline's. Also printed: pretraining tokens/s in ``fit``
against a plain PyTorch loop on the same model, rows and settings in the same run (each the
best of 3, taken in turn), and the final validation perplexity. Writes ``reports/text_few_labels.csv``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graftline import layout as paths  # noqa: E402
from graftline.config import Params, TrainConfig, parse_params  # noqa: E402
from graftline.data.dataset import Dataset  # noqa: E402
from graftline.data.modules import data_module  # noqa: E402
from graftline.data.splits import label_budget  # noqa: E402
from graftline.data.store import load_split, save_splits  # noqa: E402
from graftline.evaluate import tfidf_baseline, tfidf_proba  # noqa: E402
from graftline.models import build_classifier  # noqa: E402
from graftline.models.checkpoint import load_checkpoint  # noqa: E402
from graftline.models.text import text_model_config  # noqa: E402
from graftline.nb_em import decode_texts, fit_nb_em, nb_em_proba  # noqa: E402
from graftline.nb_em import settings as nb_em_settings  # noqa: E402
from graftline.objectives import CausalLM  # noqa: E402
from graftline.train import fit, predict_proba  # noqa: E402
from tasks import distill, finetune, preprocess, pretrain  # noqa: E402

PRESET = ROOT / "params" / "text-reviews.yaml"
ROUTES = (
    "tfidf", "nb_em", "scratch", "full", "lora", "distil", "self", "em_self", "both_self",
    "ensemble",
)  # fmt: skip
# The students: where each starts (distill.init) and who labels the corpus (distill.teacher).
STUDENTS = {
    "distil": ("scratch", "finetuned"),
    "self": ("pretrained", "finetuned"),
    "em_self": ("pretrained", "nb_em"),
    "both_self": ("pretrained", "both"),
}
# The self-training student starts where fine-tuning did: its learning rate, fewer epochs
# (the corpus is 20 times the labelled set), the last epoch kept (no held-out labels); the
# preset's distill.train is the same.
SELF_TRAIN = {
    "epochs": 4,
    "batch_size": 32,
    "optimizer": "adamw",
    "lr": 3e-4,
    "weight_decay": 0.01,
    "schedule": "onecycle",
    "keep": "last",
}


def preset(args: argparse.Namespace, **change: Any) -> Params:
    """The preset with the benchmark's changes (budget ``all`` in preprocess; keep: last;
    the networks alone: the ``ensemble`` route is the preset's ``finetune.nb_em``)."""
    p = yaml.safe_load(PRESET.read_text())
    p["preprocess"]["task"]["labels_per_class"] = "all"
    p["finetune"]["train"]["keep"] = "last"
    p["finetune"].pop("nb_em", None)
    if args.pretrain_epochs:
        p["pretrain"]["train"]["epochs"] = args.pretrain_epochs
    if args.finetune_epochs:
        p["finetune"]["train"]["epochs"] = args.finetune_epochs
    if args.quick:
        p["pretrain"]["train"].update(epochs=1, max_steps=20)
        p["finetune"]["train"]["epochs"] = 2
        p["distill"] = {"enabled": True, "train": {"epochs": 1, "max_steps": 10}}
    for key, value in change.items():
        section, _, name = key.partition(".")
        p[section] = {**p.get(section, {}), name: value} if name else value
    return parse_params(p, PRESET)


def scores(labels: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    pred = proba.argmax(1)
    return float(np.mean(pred == labels)), float(f1_score(labels, pred, average="macro"))


def model_proba(model_dir: Path, test: Dataset) -> np.ndarray:
    model, _ = load_checkpoint(model_dir / paths.MODEL_FILE)
    return predict_proba(model, data_module(test))


def model_scores(model_dir: Path, test: Dataset) -> tuple[float, float]:
    return scores(test.labels, model_proba(model_dir, test))


def plain_lm_loop(
    model: torch.nn.Module, ids: np.ndarray, pad: int, steps: int, cfg: TrainConfig
) -> float:
    """Next-token training the textbook way (nanoGPT's loop): random batches of ``ids``,
    AdamW with ``cfg``'s learning rate and weight decay, the gradient norm clipped as ``cfg``
    says, the tied output head; tokens/s over the real tokens."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(0)
    backbone = model.backbone
    bias = torch.zeros(backbone.token_embeddings().num_embeddings, requires_grad=True)
    opt.add_param_group({"params": [bias]})
    tokens, t0 = 0, time.perf_counter()
    for _ in range(steps):
        rows = torch.from_numpy(ids[rng.integers(0, len(ids), cfg.batch_size)].astype(np.int64))
        width = int((rows != pad).any(0).nonzero().max()) + 1
        rows = rows[:, :width]
        mask = rows != pad
        states = backbone.hidden({"input_ids": rows, "attention_mask": mask})
        logits = F.linear(states[:, :-1], backbone.token_embeddings().weight, bias)
        target = rows[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        opt.step()
        tokens += int(mask.sum())
    return tokens / (time.perf_counter() - t0)


def throughput(params: Params, data: Path, steps: int, repeats: int = 3) -> tuple[float, float]:
    """Tokens/s of ``fit`` with the causal-LM objective and of the plain loop, on the same
    model, the same rows and the pretraining settings: each the best of ``repeats`` runs,
    taken in turn (plain, fit, plain, fit, ...), so that warm-up and a busy moment of the
    machine fall on neither alone."""
    train = load_split(data, "train")
    cfg = text_model_config(params.pretrain.model.model_dump(), train.transform)
    tcfg = params.pretrain.train.model_copy(update={"epochs": 1, "schedule": "none"})
    n = steps * tcfg.batch_size
    part = Dataset(train.images[:n], train.labels[:n], [], train.source, transform=train.transform)
    real = int((part.images != cfg["pad_id"]).sum())
    fit_speeds, plain_speeds = [], []
    for _ in range(repeats):
        torch.manual_seed(0)
        model = build_classifier(cfg, 1, 1, 0)
        plain_speeds.append(plain_lm_loop(model, part.images, cfg["pad_id"], steps, tcfg))
        torch.manual_seed(0)
        model = build_classifier(cfg, 1, 1, 0)
        result = fit(model, part, None, tcfg, seed=0, objective=CausalLM(cfg["vocab_size"]))
        fit_speeds.append(real / (n / result.items_per_s))
    return max(fit_speeds), max(plain_speeds)


def _class_count(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    if not name or not count.isdigit() or int(count) < 1:
        raise SystemExit(f"--nb-components: {text!r} is not CLASS=N with N >= 1")
    return name, int(count)


def strategies(routes: list[str]) -> list[str]:
    """The fine-tuning runs the routes need: ``full`` also trains the scratch baseline (the
    finetune stage does both) and is the teacher distil starts from."""
    wanted = ["full"] if {"full", "scratch", "ensemble", *STUDENTS} & set(routes) else []
    return wanted + (["lora"] if "lora" in routes else [])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--budgets", nargs="+", default=["10", "50", "100", "all"])
    ap.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    ap.add_argument(
        "--nb-components",
        nargs="*",
        default=["other=4"],
        metavar="CLASS=N",
        help="mixture components of a class for the nb_em and ensemble routes (default: "
        "other=4; the students' teacher keeps the preset's distill.nb_em)",
    )
    ap.add_argument("--pretrain-epochs", type=int, help="over the 3,993 reviews")
    ap.add_argument("--finetune-epochs", type=int, help="over the labelled reviews")
    ap.add_argument("--speed-steps", type=int, default=30, help="steps of the speed comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a smoke run; its figures mean nothing")
    args = ap.parse_args()
    if "ensemble" in args.routes and "nb_em" not in args.routes:  # one of its two models
        args.routes.append("nb_em")
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = preset(args)
        nb_params = base.distill.nb_em.model_copy(
            update={"components": dict(_class_count(c) for c in args.nb_components)}
        )
        t0 = time.perf_counter()
        preprocess.run(base, work / "processed")
        pre_out = work / "pretrained"
        pretrained = pretrain.run(
            base, work / "processed/pretrain", pre_out, work / "reports/pretrain", work / "ck"
        )
        pre_minutes = (time.perf_counter() - t0) / 60
        ppl = pretrained["metrics"].get("val_perplexity", math.nan)
        fit_speed, plain_speed = throughput(base, work / "processed/pretrain", args.speed_steps)
        full = load_split(work / "processed/task", "train")
        val = load_split(work / "processed/task", "val")
        test = load_split(work / "processed/task", "test")
        pool = Dataset(
            np.concatenate([full.images, val.images]),
            np.concatenate([full.labels, val.labels]),
            full.classes,
            full.source,
            transform=full.transform,
        )
        corpus = load_split(work / "processed/pretrain", "train", mmap=True)
        corpus_texts = decode_texts(corpus.images, corpus.transform)  # for nb_em, once
        test_texts = decode_texts(test.images, test.transform)
        for budget in args.budgets:
            for draw in args.draws if budget != "all" else args.draws[:1]:
                k: int | str = "all" if budget == "all" else int(budget)
                labelled = pool if k == "all" else label_budget(pool, k, draw)
                task = work / f"task-{budget}-{draw}"
                # validation is the labelled items themselves: no held-out label is used
                save_splits(task, {"train": labelled, "val": labelled, "test": test}, {})
                row = {"budget": budget, "draw": draw, "labels": len(labelled)}
                if "tfidf" in args.routes:
                    t = time.perf_counter()
                    lr = tfidf_baseline(labelled, base.evaluate.tfidf.C, base.evaluate.tfidf.ngrams)
                    row["tfidf"], row["tfidf_f1"] = scores(
                        test.labels, tfidf_proba(lr, test, len(test.classes))
                    )
                    row["tfidf_min"] = (time.perf_counter() - t) / 60
                if "nb_em" in args.routes:  # naive Bayes + EM over the corpus (ensemble: too)
                    t = time.perf_counter()
                    em = fit_nb_em(
                        decode_texts(labelled.images, labelled.transform),
                        labelled.labels,
                        corpus_texts,
                        len(labelled.classes),
                        **nb_em_settings(nb_params, labelled.classes),
                    )
                    nb_proba = nb_em_proba(em, test_texts)
                    row["nb_em"], row["nb_em_f1"] = scores(test.labels, nb_proba)
                    row["nb_em_min"] = (time.perf_counter() - t) / 60
                for strategy in strategies(args.routes):
                    params = preset(args, **{"finetune.strategy": strategy})
                    t = time.perf_counter()
                    out = work / f"m-{budget}-{draw}-{strategy}"
                    res = finetune.run(
                        params, task, pre_out, out / "ft", out / "scratch", out / "rep", work / "ck"
                    )
                    tuned = model_proba(out / "ft", test)
                    row[strategy], row[f"{strategy}_f1"] = scores(test.labels, tuned)
                    row[f"{strategy}_min"] = (time.perf_counter() - t) / 60
                    if strategy == "full" and "ensemble" in args.routes:
                        # the fine-tuned network x naive Bayes + EM, at test time
                        product = np.log(np.maximum(tuned, 1e-12)) + np.log(
                            np.maximum(nb_proba, 1e-12)
                        )
                        row["ensemble"], row["ensemble_f1"] = scores(test.labels, product)
                        row["ensemble_min"] = row["full_min"] + row["nb_em_min"]
                    row[f"{strategy}_trainable"] = res["metrics"]["finetuned"]["trainable_fraction"]
                    if strategy == "full":
                        row["scratch"], row["scratch_f1"] = model_scores(out / "scratch", test)
                    for route, (init, teacher) in STUDENTS.items():
                        if strategy != "full" or route not in args.routes:
                            continue
                        dparams = copy.deepcopy(params.model_dump())
                        dparams["distill"].update(enabled=True, init=init, teacher=teacher)
                        # self-training: fine-tuning's settings over the corpus (the preset's);
                        # a student from scratch: distill's default training
                        dparams["distill"]["train"] = (
                            SELF_TRAIN if init == "pretrained" else TrainConfig().model_dump()
                        )
                        dp = parse_params(dparams, PRESET)
                        t = time.perf_counter()
                        distill.run(
                            dp, work / "processed/pretrain", task, out / "ft", out / route,
                            out / f"{route}-rep", work / "ck", pre_out,
                        )  # fmt: skip
                        row[route], row[f"{route}_f1"] = model_scores(out / route, test)
                        row[f"{route}_min"] = (time.perf_counter() - t) / 60
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    table = pd.DataFrame(rows)
    out_csv = ROOT / "reports" / "text_few_labels.csv"
    out_csv.parent.mkdir(exist_ok=True)
    table.to_csv(out_csv, index=False)
    print(f"\npretraining (once): {pre_minutes:.1f} min, final val perplexity {ppl:.1f}")
    print(
        f"pretraining speed: fit {fit_speed:,.0f} tokens/s, plain loop {plain_speed:,.0f} "
        f"tokens/s, ratio {fit_speed / plain_speed:.2f}"
    )
    print("\ntest accuracy (macro-F1), mean ± std over draws; minutes per route and draw")
    for budget, group in table.groupby("budget", sort=False):
        cells = []
        for route in [r for r in ROUTES if r in group]:
            acc, f1 = group[route], group[f"{route}_f1"]
            minutes = group.get(f"{route}_min", group.get("full_min"))
            extra = (
                f", trainable {group[f'{route}_trainable'].mean():.3f}"
                if f"{route}_trainable" in group
                else ""
            )
            cells.append(
                f"{route} {acc.mean():.3f} ± {acc.std(ddof=0):.3f} ({f1.mean():.3f}; "
                f"{minutes.mean():.1f} min{extra})"
            )
        print(f"  {budget:>4} per class: " + "; ".join(cells))
    print(f"\nwritten: {out_csv}")


if __name__ == "__main__":
    main()
