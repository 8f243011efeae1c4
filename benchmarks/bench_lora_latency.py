"""LoRA's cost at inference: the ViT of params/vit-mae.yaml as a plain model, with adapters
merged into its weights (what is exported), and with adapters left in (what trains).

    .venv/bin/python benchmarks/bench_lora_latency.py [--requests 2000] [--threads 1]

Single-image forward passes, as `graftline serve` runs them for one drawn digit, timed one by
one after a warm-up, interleaved so that drift in machine load hits the three alike; prints
p50 and p99 in milliseconds and the ratio of each to the plain model. Target (issue 10):
merged equals plain within noise. The merged model is checked to compute what the adapted
one does.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graftline.config import load_params  # noqa: E402
from graftline.models import build_classifier  # noqa: E402
from graftline.models.lora import adapter_layers, add_adapters, merge_adapters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params", type=Path, default=ROOT / "params" / "vit-mae.yaml")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    torch.manual_seed(0)
    plain = build_classifier(params.pretrain.model.model_dump(), 1, 28, 10).eval()
    adapted = copy.deepcopy(plain)
    lora = params.finetune.lora
    adapted.backbone = add_adapters(adapted.backbone, lora.targets, lora.rank, lora.alpha)
    for layer in adapter_layers(adapted):  # as if trained: a non-zero update
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    adapted.eval()
    merged = copy.deepcopy(adapted)
    merge_adapters(merged)
    merged.eval()
    x = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-4)
    models = {"plain": plain, "merged LoRA": merged, "unmerged LoRA": adapted}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(50):
                m(x)
        for _ in range(args.requests):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    base = np.percentile(times["plain"], 50)
    print(f"ViT {params.pretrain.model.model_dump()}, LoRA rank {lora.rank} on {lora.targets}")
    print(f"{args.requests} single-image forwards each, {args.threads} thread(s)")
    for name, t in times.items():
        p50, p99 = np.percentile(t, 50) * 1e3, np.percentile(t, 99) * 1e3
        print(
            f"  {name:14s} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  p50/plain {p50 / 1e3 / base:.2f}"
        )


if __name__ == "__main__":
    main()
