"""Serving: graftline's service against `mlflow models serve` on the same model version,
side by side in the same run, then a bounded loopback load test with a promotion midway.

    python benchmarks/bench_serve.py [--single 1000] [--batches 200] [--load 10000] \
        [--params params/vit-mae.yaml | params/text-reviews.yaml] [--runtime onnx]

The model is the architecture of the params file (default params.yaml: the seed CNN;
params/vit-mae.yaml: the ViT, which is what a merged LoRA export is; params/text-reviews.yaml:
the text decoder, its tokenizer trained on the fine-food reviews, whose requests are real
reviews), registered in a temporary SQLite store. With `--runtime onnx` a second graftline
service answers from the same version's model.onnx on ONNX Runtime, measured beside the
PyTorch one and MLflow's (target: its single-item p50 <= 0.7x the PyTorch runtime's), and
the load test runs against it. Latency: sequential single-image requests over keep-alive, p50 and
p99. Throughput: sequential batches of 64. Load: `--load` requests at concurrency 16 to
graftline, with `champion` moved to a new version halfway; every request must succeed and
the answers must switch version. Targets (issue 4): single-image p50 no higher than
MLflow's, at least twice its throughput on batches of 64, no failed request in the load
test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graftline import layout as paths  # noqa: E402
from graftline import tracking  # noqa: E402
from graftline.config import load_params, parse_params  # noqa: E402
from graftline.data.dataset import Dataset  # noqa: E402
from graftline.data.store import save_splits  # noqa: E402
from graftline.models import build_classifier, save_checkpoint  # noqa: E402
from graftline.registry import Registry  # noqa: E402
from tasks import deploy  # noqa: E402

NAME = "bench-digits"
GRAFTLINE_SERVE = [sys.executable, "-m", "graftline.cli", "serve", "--poll", "0.5"]
GRAFTLINE_SERVE += ["--max-batch", "256"]
MLFLOW_SERVE = [sys.executable, "-m", "mlflow", "models", "serve", "--env-manager", "local", "-m"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"server exited early: {url}")
        time.sleep(0.3)
    sys.exit(f"{url} did not come up")


def setup_text(work: Path, params: Any) -> list[str]:
    """A text model of the params' size over a tokenizer trained on the fine-food reviews,
    written where finetune writes; returns test reviews to send."""
    from graftline.config import FineFoodSource
    from graftline.data.text import load_fine_food, token_spec, tokenize_dataset, train_tokenizer
    from graftline.models.text import text_model_config

    corpus, test = load_fine_food(FineFoodSource(kind="fine_food"))
    tp = params.preprocess.tokenizer
    tok = train_tokenizer(list(corpus.images), tp)
    spec = token_spec(tok, tp, 0)
    ds, _ = tokenize_dataset(test.subset(np.arange(50)), tok, spec)
    save_splits(work / paths.TASK_DATA, {"test": ds}, {}, texts=True)
    cfg = text_model_config(params.pretrain.model.model_dump(), spec)
    save_checkpoint(
        work / paths.FINETUNED / paths.MODEL_FILE,
        build_classifier(cfg, 1, tp.max_len, len(test.classes)),
        model_config=cfg,
        classes=list(test.classes),
        input_shape=(tp.max_len,),
        transform=spec,
    )
    return [str(t) for t in test.images[50:]]


def setup(work: Path, params_file: Path) -> list[str] | None:
    """Register the params file's architecture twice (v1 champion, v2 for the mid-load
    switch); for a text model, returns the texts to send."""
    params = load_params(params_file)
    texts = None
    if params.preprocess.text:
        texts = setup_text(work, params)
    else:
        rng = np.random.default_rng(0)
        test = Dataset(
            rng.integers(0, 255, (50, 1, 28, 28), dtype=np.uint8),
            np.arange(50) % 10,
            [str(i) for i in range(10)],
            "bench",
        )
        save_splits(work / paths.TASK_DATA, {"test": test}, {})
        model = build_classifier(params.pretrain.model.model_dump(), 1, 28, 10)
        save_checkpoint(
            work / paths.FINETUNED / paths.MODEL_FILE,
            model,
            model_config=params.pretrain.model.model_dump(),
            classes=test.classes,
            input_shape=(1, 28, 28),
        )
    p = parse_params({"deploy": {"model_name": NAME, "gate": {"min_accuracy": 0.0}}})
    for _ in range(2):
        t0 = time.perf_counter()
        with tracking.stage_run("deploy", p.deploy.model_dump(), work):
            done = deploy.run(p, work)
        tags = Registry(NAME).version(done["version"]).tags
        print(
            f"deploy v{done['version']}: {time.perf_counter() - t0:.1f} s, of which ONNX export "
            f"and check {tags.get('graftline.export.onnx_seconds', '?')} s; model.onnx "
            f"{int(tags.get('graftline.export.onnx_bytes', 0)) / 1e6:.2f} MB, checkpoint "
            f"{(work / paths.FINETUNED / paths.MODEL_FILE).stat().st_size / 1e6:.2f} MB, max "
            f"|logit difference| {tags.get('graftline.export.onnx_max_abs_diff', '?')}",
            flush=True,
        )
    return texts


def latency(client: httpx.Client, url: str, body: bytes, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        r = client.post(url, content=body, headers={"content-type": "application/json"})
        out[i] = time.perf_counter() - t0
        r.raise_for_status()
    return out * 1000


def load_test(url: str, body: bytes, total: int, concurrency: int, promote_at: int) -> dict:
    counter = iter(range(total))
    lock = threading.Lock()
    versions: Counter[str] = Counter()
    errors: list[str] = []
    first_v2: list[int] = []

    def worker() -> None:
        with httpx.Client(timeout=30) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if i == promote_at:
                    reg = Registry(NAME)
                    reg.promote("2", expected_champion="1", reason="benchmark: mid-load switch")
                try:
                    r = c.post(url, content=body, headers={"content-type": "application/json"})
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:100]}")
                        continue
                    v = r.json()["model_version"]
                    with lock:
                        versions[v] += 1
                        if v == "2" and not first_v2:
                            first_v2.append(i)
                except httpx.HTTPError as err:
                    errors.append(repr(err))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "seconds": time.perf_counter() - t0,
        "versions": dict(versions),
        "errors": errors,
        "first_v2_request": first_v2[0] if first_v2 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--single", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--load", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--params", type=Path, default=ROOT / "params.yaml", help="whose model to serve"
    )
    ap.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: also serve the version's model.onnx on ONNX Runtime, measured beside "
        "the PyTorch runtime and MLflow's, and load-test that one",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graftline-serve-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GRAFTLINE_API_TOKEN": "",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    procs: list[subprocess.Popen] = []
    try:
        texts = setup(work, args.params)
        (work / "params.yaml").write_text(json.dumps({"deploy": {"model_name": NAME}}))
        log = (work / "servers.log").open("w")

        def start(cmd: list[str]) -> subprocess.Popen:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.append(proc)
            return proc

        servers: dict[str, tuple[str, subprocess.Popen, str]] = {}  # name: url, proc, ready
        runtimes = ["torch", "onnx"] if args.runtime == "onnx" else ["torch"]
        for runtime in runtimes:
            port = free_port()
            proc = start([*GRAFTLINE_SERVE, "--port", str(port), "--runtime", runtime])
            base = f"http://127.0.0.1:{port}"
            servers[f"graftline {runtime}"] = (f"{base}/predict", proc, f"{base}/ready")
        port = free_port()
        proc = start([*MLFLOW_SERVE, f"models:/{NAME}/1", "-h", "127.0.0.1", "-p", str(port)])
        base = f"http://127.0.0.1:{port}"
        servers["mlflow"] = (f"{base}/invocations", proc, f"{base}/ping")
        for _, proc, ready in servers.values():
            wait(ready, proc)
        rng = np.random.default_rng(1)
        bodies: dict[str, dict[str, bytes]] = {}
        if texts is None:
            one = rng.integers(0, 255, (1, 1, 28, 28)).astype(float).tolist()
            batch = rng.integers(0, 255, (64, 1, 28, 28)).astype(float).tolist()
            for name in servers:
                bodies[name] = {
                    n: json.dumps({"inputs": x}).encode()
                    for n, x in (("one", one), ("batch", batch))
                }
        else:
            picked = {"one": texts[:1], "batch": texts[1:65]}
            for name in servers:
                bodies[name] = {
                    n: json.dumps(
                        {"dataframe_records": [{"text": t} for t in x]}
                        if name == "mlflow"
                        else {"texts": x}
                    ).encode()
                    for n, x in picked.items()
                }
        lat: dict[str, list[np.ndarray]] = {n: [] for n in servers}
        per_batch: dict[str, list[np.ndarray]] = {n: [] for n in servers}
        with httpx.Client(timeout=60) as c:
            for name, (url, _, _) in servers.items():  # warm-up
                latency(c, url, bodies[name]["one"], 50)
                latency(c, url, bodies[name]["batch"], 5)
            for _ in range(4):  # interleaved blocks, so machine drift hits all alike
                for name, (url, _, _) in servers.items():
                    lat[name].append(latency(c, url, bodies[name]["one"], args.single // 4))
            for _ in range(4):
                for name, (url, _, _) in servers.items():
                    per_batch[name].append(
                        latency(c, url, bodies[name]["batch"], args.batches // 4)
                    )
        kind = "text" if texts is not None else "image"
        p50 = {n: np.percentile(np.concatenate(v), 50) for n, v in lat.items()}
        p99 = {n: np.percentile(np.concatenate(v), 99) for n, v in lat.items()}
        tp = {n: 64 * 1000 / np.concatenate(v).mean() for n, v in per_batch.items()}
        print(f"single {kind}, {args.single} sequential requests each (ms):")
        for n in servers:
            print(f"  {n:16s} p50 {p50[n]:7.2f}  p99 {p99[n]:7.2f}")
        print(
            f"  ratio p50 graftline torch/mlflow: {p50['graftline torch'] / p50['mlflow']:.2f} "
            "(target <= 1.0)"
        )
        if "graftline onnx" in servers:
            print(
                f"  ratio p50 graftline onnx/torch: "
                f"{p50['graftline onnx'] / p50['graftline torch']:.2f} (target <= 0.7)"
            )
        print(f"batches of 64, {args.batches} sequential requests each ({kind}s/s):")
        print("  " + "   ".join(f"{n} {tp[n]:8.0f}" for n in servers))
        print(
            f"  ratio graftline torch/mlflow {tp['graftline torch'] / tp['mlflow']:.2f} "
            "(target >= 2.0)"
            + (
                f", onnx/torch {tp['graftline onnx'] / tp['graftline torch']:.2f}"
                if "graftline onnx" in servers
                else ""
            )
        )
        g_url = servers[f"graftline {runtimes[-1]}"][0]
        name = f"graftline {runtimes[-1]}"
        res = load_test(g_url, bodies[name]["one"], args.load, args.concurrency, args.load // 2)
        print(
            f"load test ({name}): {args.load} single-{kind} requests at concurrency {args.concurrency} "
            f"in {res['seconds']:.1f} s ({args.load / res['seconds']:.0f} req/s), "
            f"champion moved v1 -> v2 at request {args.load // 2}"
        )
        print(
            f"  failed requests: {len(res['errors'])}   answers by version: {res['versions']}   "
            f"first v2 answer at request {res['first_v2_request']}"
        )
        if res["errors"]:
            print("  first errors:", res["errors"][:3])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
