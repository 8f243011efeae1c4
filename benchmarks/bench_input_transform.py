"""Digits drawn small in a corner: what the model's recorded input transform buys at serving.

Takes MNIST test digits, draws each on a 280x280 canvas (the web page's) either large and
centred or small (70 px) near a random corner, and scores the registered version through
``graftline.serve.batch.prepare_image`` (what ``graftline serve``, the page and ``graftline
predict`` run) with the transform the model carries, then with a plain resize (what serving
did before transforms were recorded), in the same run.

    .venv/bin/python benchmarks/bench_input_transform.py --data /path/to/mnist [--version 1]
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graftline import tracking  # noqa: E402
from graftline.config import load_params  # noqa: E402
from graftline.data.transforms import legacy_geometry  # noqa: E402
from graftline.serve.batch import prepare_image  # noqa: E402
from graftline.serve.champion import load_version  # noqa: E402


def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    nd = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with MNIST's t10k files")
    ap.add_argument("--version", help="registered version (default: the champion)")
    ap.add_argument("-n", type=int, default=500, help="test digits")
    args = ap.parse_args()
    from mlflow import MlflowClient

    from graftline.registry import Registry

    tracking.configure(ROOT)
    name = load_params(ROOT / "params.yaml").deploy.model_name
    version = args.version or Registry(name).champion_version()
    if version is None:
        sys.exit(f"{name} has no champion; pass --version")
    model = load_version(MlflowClient(), name, str(version))
    images = read_idx(next(args.data.glob("t10k-images*")))
    labels = read_idx(next(args.data.glob("t10k-labels*")))
    rng = np.random.default_rng(0)
    pick = rng.choice(len(images), args.n, replace=False)
    canvases = {"large, centred": [], "small, in a corner": []}
    for i in pick:
        big = Image.fromarray(images[i]).resize((280, 280), Image.Resampling.BILINEAR)
        canvases["large, centred"].append(np.asarray(big))
        small = np.asarray(Image.fromarray(images[i]).resize((70, 70), Image.Resampling.BILINEAR))
        canvas = np.zeros((280, 280), np.uint8)
        r, c = (int(v) for v in rng.integers(0, 40, 2))
        corner = int(rng.integers(0, 4))
        r = r if corner < 2 else 210 - r
        c = c if corner % 2 == 0 else 210 - c
        canvas[r : r + 70, c : c + 70] = small
        canvases["small, in a corner"].append(canvas)
    truth = np.array([str(labels[i]) for i in pick])
    print(f"{name} v{version}, {args.n} MNIST test digits on a 280x280 canvas")
    for label, tf in (
        (f"recorded transform ({model.transform['fit']})", model.transform),
        ("plain resize (reference)", legacy_geometry(model.input_shape)),
    ):
        for how, drawn in canvases.items():
            x = np.stack([prepare_image(Image.fromarray(c), tf) for c in drawn])
            pred = np.array(model.classes)[model.predict_proba(x).argmax(1)]
            print(f"  {label:34s} {how:20s} accuracy {np.mean(pred == truth):.3f}")


if __name__ == "__main__":
    main()
