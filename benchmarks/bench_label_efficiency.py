"""Label efficiency: test accuracy at 1, 5, 10, 20 and all labels per class, for the
pretrained backbone fine-tuned, the same network trained from scratch, and the SVC.

The curve that says why pretraining pays: the fewer the labels, the larger the gap. It runs
the real stage code (``tasks.preprocess.prepare``, ``tasks.finetune``'s grafting and
strategy, ``graftline.train.fit``, the SVC baseline) on this checkout's params and pretrained
backbone (``dvc repro pretrain`` first), with each budget drawn from the train split by the
same seeded ``label_budget`` as the pipeline; the test split is the same for every point.

    .venv/bin/python benchmarks/bench_label_efficiency.py [--budgets 1 5 10 20 all] [--epochs N]

Writes ``reports/label_efficiency.csv`` and ``.png`` (which the evaluation report shows) and
prints the table with the fine-tuned/scratch accuracy ratio at each budget.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graftline import layout as paths  # noqa: E402
from graftline.config import load_params  # noqa: E402
from graftline.data.splits import label_budget  # noqa: E402
from graftline.evaluate import plot_label_efficiency, svc_baseline, svc_proba  # noqa: E402
from graftline.models import build_classifier  # noqa: E402
from graftline.models.checkpoint import load_checkpoint  # noqa: E402
from graftline.train import fit, predict_proba  # noqa: E402
from tasks.finetune import graft, strategy_groups  # noqa: E402
from tasks.preprocess import prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", nargs="+", default=["1", "5", "10", "20", "all"])
    ap.add_argument("--epochs", type=int, help="fine-tuning epochs (default: params.yaml's)")
    ap.add_argument(
        "--root", type=Path, default=ROOT, help="the checkout whose params, data and backbone"
    )
    ap.add_argument("--out", type=Path, help="default: ROOT/reports/label_efficiency.csv")
    args = ap.parse_args()
    root = args.root.resolve()
    out = (args.out or root / "reports" / "label_efficiency.csv").resolve()
    os.chdir(root)  # sources name their files relative to the checkout

    params = load_params(root / "params.yaml")
    pre = params.preprocess.model_copy(
        update={"task": params.preprocess.task.model_copy(update={"labels_per_class": "all"})}
    )
    _, splits, _ = prepare(pre)
    full, val, test = splits["train"], splits["val"], splits["test"]
    checkpoint = root / paths.PRETRAINED / paths.MODEL_FILE
    if not checkpoint.exists():
        sys.exit(f"{checkpoint}: no pretrained backbone; run `dvc repro pretrain` first")
    _, ckpt = load_checkpoint(checkpoint)
    p = params.finetune
    cfg = p.train if args.epochs is None else p.train.model_copy(update={"epochs": args.epochs})
    shape = tuple(full.images.shape[1:])

    rows = []
    for budget in args.budgets:
        per_class: int | str = budget if budget == "all" else int(budget)
        train = label_budget(full, per_class, pre.seed)
        t0 = time.perf_counter()
        accs = {}
        for name in ("finetuned", "scratch"):
            torch.manual_seed(p.seed)
            if name == "finetuned":
                fresh, _ = load_checkpoint(checkpoint)  # every budget starts from the backbone
                model = graft(fresh, len(full.classes))
                groups = strategy_groups(model, p)
            else:
                model = build_classifier(
                    ckpt["model_config"], shape[0], shape[1], len(full.classes)
                )
                groups = None
            fit(model, train, val, cfg, seed=p.seed, groups=groups, desc=f"{name}@{budget}")
            accs[name] = float((predict_proba(model, test.images).argmax(1) == test.labels).mean())
        svc = svc_baseline(train, C=params.evaluate.svc.C, gamma=params.evaluate.svc.gamma)
        accs["svc"] = float(
            (svc_proba(svc, test, len(test.classes)).argmax(1) == test.labels).mean()
        )
        rows.append(
            {
                "labels_per_class": budget,
                "train_labels": len(train),
                **{f"{k}_accuracy": round(v, 4) for k, v in accs.items()},
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        r = rows[-1]
        print(
            f"{budget:>4} per class ({len(train):4d} labels): finetuned {r['finetuned_accuracy']:.4f}"
            f"  scratch {r['scratch_accuracy']:.4f}  svc {r['svc_accuracy']:.4f}"
            f"  finetuned/scratch {r['finetuned_accuracy'] / max(r['scratch_accuracy'], 1e-9):.2f}x"
            f"  ({r['seconds']} s)",
            flush=True,
        )
    table = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    plot_label_efficiency(table, out.with_suffix(".png"), len(test))
    print(f"wrote {out} and {out.with_suffix('.png')} (test split: {len(test)} items)")


if __name__ == "__main__":
    main()
