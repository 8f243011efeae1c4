"""Wall time of `dvc repro` from nothing and of the no-op re-run, on the default params.

    python benchmarks/bench_pipeline.py

Runs in a temporary copy of the repo; prints the times and the evaluation metrics.
Targets (issue 2): cold under 120 s on 2 CPU cores, no-op under 3 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import yaml
from _common import copy_repo, run


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--labels",
        default=None,
        help="override preprocess.task.labels_per_class (a number or 'all')",
    )
    args = ap.parse_args()
    repo = copy_repo()
    if args.labels is not None:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        lpc = args.labels if args.labels == "all" else int(args.labels)
        params["preprocess"]["task"]["labels_per_class"] = lpc
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        t0 = time.perf_counter()
        run(["dvc", "repro"], repo)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run(["dvc", "repro"], repo)
        noop = time.perf_counter() - t0
        assert "Running stage" not in out.stdout, out.stdout
        metrics = json.loads((repo / "reports/metrics.json").read_text())
        pre = json.loads((repo / "reports/pretrain/metrics.json").read_text())
        print(
            f"dvc repro, cold:  {cold:7.1f} s   (target < 120 s; ratio to target {cold / 120:.2f})"
        )
        print(f"dvc repro, no-op: {noop:7.2f} s   (target < 3 s;  ratio to target {noop / 3:.2f})")
        print(
            f"labels per class: {metrics['train_labels'] // 10 if args.labels != 'all' else 'all'}"
            f" ({metrics['train_labels']} train labels, {metrics['test_size']} test items)"
        )
        print(f"pretrain val_acc: {pre['val_acc']:.4f}")
        for m in ("finetuned", "scratch", "svc"):
            print(
                f"test accuracy {m:9s}: {metrics[m]['accuracy']:.4f}  macro-F1 "
                f"{metrics[m]['macro_f1']:.4f}  ECE {metrics[m]['ece']:.4f}"
            )
    finally:
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
