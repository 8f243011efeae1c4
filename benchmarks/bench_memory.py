"""Training on a corpus larger than memory: the memory-mapped store against in-memory arrays.

    .venv/bin/python benchmarks/bench_memory.py [--gb 3.0] [--fits 300000]

Writes a synthetic corpus of ``--gb`` gigabytes of 28x28 uint8 pixels in the processed
store's own format (``<split>.npy`` + ``.npz`` + ``manifest.json``, as ``tasks.preprocess``
writes it), then trains one epoch of a small CNN on it through ``graftline.train.fit`` with the
images memory-mapped (``load_split(..., mmap=True)``, what ``tasks.pretrain`` does), in a
process of its own, and reports its peak resident memory (target: under 1.5 GB) and
images/s. Reference, same run: one epoch on a corpus that fits (``--fits`` images) loaded into
memory, against the same corpus memory-mapped (target: memory-mapped >= 0.9x).

Then the ``distill`` stage on the large corpus (``tasks.distill.run``, in a process of its own):
the teacher labels every corpus image with soft targets and a student trains one epoch on the
corpus beside a small labelled set, reading the corpus batch by batch; its peak resident
memory has the same target (under 1.5 GB). ``--stages fit`` or ``distill`` runs one alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graftline.data.store import MANIFEST  # noqa: E402
from graftline.io import hash_arrays  # noqa: E402

SIDE = 28

CHILD = """
import json, sys, time
import torch
from graftline.config import TrainConfig
from graftline.data.store import load_split
from graftline.models import build_classifier
from graftline.train import fit
root, mmap = sys.argv[1], sys.argv[2] == "mmap"
train, val = load_split(root, "train", mmap=mmap), load_split(root, "val")
torch.manual_seed(0)
model = build_classifier({"arch": "cnn", "channels": [8, 16], "hidden": 32, "dropout": 0.0}, 1, 28, 10)
cfg = TrainConfig(epochs=1, batch_size=512, lr=0.003, schedule="none", num_threads=2)
result = fit(model, train, val, cfg, seed=0, progress=False)
print(json.dumps({
    "images_per_s": result.images_per_s,
    # VmHWM: the peak of this process's own memory since exec (ru_maxrss would carry over the
    # parent's resident set at fork time, here the freshly written corpus)
    "peak_rss_gb": next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 2**20,
}))
"""


DISTILL_CHILD = """
import json, sys
from pathlib import Path
import numpy as np, torch
from graftline.config import parse_params
from graftline.data.store import load_split, save_splits
from graftline.models import build_classifier, save_checkpoint
from tasks import distill
corpus, work = Path(sys.argv[1]), Path(sys.argv[2])
val = load_split(corpus, "val")  # 2,000 labelled images: the task's train and val
save_splits(work / "task", {"train": val.subset(np.arange(1000)), "val": val.subset(np.arange(1000, 2000))}, {})
cnn = {"arch": "cnn", "channels": [8, 16], "hidden": 32, "dropout": 0.0}
torch.manual_seed(0)
save_checkpoint(work / "teacher" / "model.pt", build_classifier(cnn, 1, 28, 10), model_config=cnn,
                classes=val.classes, input_shape=(1, 28, 28))
steps = int(sys.argv[3]) or None
train = {"epochs": 1, "batch_size": 512, "lr": 0.003, "schedule": "none", "num_threads": 2,
         "max_steps": steps}
params = parse_params({"distill": {"enabled": True, "model": cnn, "train": train}})
t0 = __import__("time").perf_counter()
out = distill.run(params, corpus=corpus, data=work / "task", teacher=work / "teacher",
                  out=work / "student", reports=work / "reports", checkpoints=work / "ck")
print(json.dumps({
    "seconds": __import__("time").perf_counter() - t0,
    "corpus_images": out["metrics"]["corpus_images"],
    "peak_rss_gb": next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 2**20,
}))
"""


def write_store(dest: Path, n: int, seed: int = 0, chunk: int = 200_000) -> float:
    """A labelled synthetic corpus of ``n`` images, written a chunk at a time; returns GB."""
    dest.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(
        dest / "train.npy", mode="w+", dtype=np.uint8, shape=(n, 1, SIDE, SIDE)
    )
    labels = rng.integers(0, 10, n).astype(np.int64)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        block = rng.integers(0, 40, (m, 1, SIDE, SIDE), dtype=np.uint8)
        rows = (labels[i : i + m] * 2 + 4)[:, None]  # a bright bar whose row is the class
        block[np.arange(m)[:, None], 0, rows + np.arange(2)[None, :], :] = 255
        images[i : i + m] = block
    images.flush()
    val_images = np.asarray(images[:2000]).copy()
    val_labels = labels[:2000]
    np.savez(dest / "train.npz", labels=labels, ids=np.array([], dtype=str))
    np.save(dest / "val.npy", val_images)
    np.savez(dest / "val.npz", labels=val_labels, ids=np.array([], dtype=str))
    manifest = {
        "format": "graftline.dataset/1",
        "classes": [str(k) for k in range(10)],
        "labelled": True,
        "shape": [1, SIDE, SIDE],
        "source": "synthetic",
        "transform": {},
        "splits": {
            "train": {"count": n, "sha256": hash_arrays(images, labels)},
            "val": {"count": 2000, "sha256": hash_arrays(val_images, val_labels)},
        },
    }
    (dest / MANIFEST).write_text(json.dumps(manifest))
    gb = images.nbytes / 1e9
    del images
    return gb


def epoch(root: Path, mode: str, child: str = CHILD, *more: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", child, str(root), mode, *more],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=3.0, help="size of the large corpus's pixels")
    ap.add_argument("--fits", type=int, default=300_000, help="images of the corpus that fits")
    ap.add_argument("--work", type=Path, help="folder for the corpora (default: a temp folder)")
    ap.add_argument("--stages", nargs="+", choices=["fit", "distill"], default=["fit", "distill"])
    ap.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="stop the student after this many steps (0: the whole epoch); the resident set "
        "peaks in the first ones, once the teacher's soft targets are held",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graftline-bench-memory-", dir=args.work))
    try:
        t0 = time.perf_counter()
        if "fit" in args.stages:
            small = work / "fits"
            write_store(small, args.fits)
            in_memory = epoch(small, "memory")
            mapped_small = epoch(small, "mmap")
            shutil.rmtree(small)
        n = int(args.gb * 1e9 / (SIDE * SIDE)) + 1
        gb = write_store(work / "large", n)
        print(f"wrote {gb:.2f} GB ({n:,} images) in {time.perf_counter() - t0:.0f} s")
        large = epoch(work / "large", "mmap") if "fit" in args.stages else None
        (work / "distill").mkdir()
        stage = (
            epoch(work / "large", str(work / "distill"), DISTILL_CHILD, str(args.distill_steps))
            if "distill" in args.stages
            else None
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if large is not None:
        print(f"corpus that fits ({args.fits:,} images, one epoch, small CNN, 2 threads):")
        print(
            f"  in memory:       {in_memory['images_per_s']:8.0f} images/s, peak RSS {in_memory['peak_rss_gb']:.2f} GB"
        )
        print(
            f"  memory-mapped:   {mapped_small['images_per_s']:8.0f} images/s, peak RSS {mapped_small['peak_rss_gb']:.2f} GB"
        )
        print(
            f"  ratio memory-mapped/in-memory: {mapped_small['images_per_s'] / in_memory['images_per_s']:.2f} (target >= 0.9)"
        )
        print(f"corpus of {gb:.2f} GB, memory-mapped, one epoch:")
        print(
            f"  {large['images_per_s']:8.0f} images/s, peak RSS {large['peak_rss_gb']:.2f} GB (target < 1.5 GB)"
        )
    if stage is not None:
        what = f"{args.distill_steps} student steps" if args.distill_steps else "one student epoch"
        print(f"distill stage on the {gb:.2f} GB corpus (soft targets + {what}):")
        print(
            f"  {stage['corpus_images']:,} corpus images in {stage['seconds'] / 60:.1f} min, "
            f"peak RSS {stage['peak_rss_gb']:.2f} GB (target < 1.5 GB)"
        )


if __name__ == "__main__":
    main()
