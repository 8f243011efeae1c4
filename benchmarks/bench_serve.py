"""Serving: graftline's service against `mlflow models serve` on the same model version,
side by side in the same run, then a bounded loopback load test with a promotion midway.

    python benchmarks/bench_serve.py [--single 1000] [--batches 200] [--load 10000] \
        [--params params/vit-mae.yaml]

The model is the architecture of the params file (default params.yaml: the seed CNN;
params/vit-mae.yaml: the ViT, which is what a merged LoRA export is), registered in a
temporary SQLite store. Latency: sequential single-image requests over keep-alive, p50 and
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


def setup(work: Path, params_file: Path) -> None:
    """Register the params file's architecture twice (v1 champion, v2 for the mid-load
    switch)."""
    params = load_params(params_file)
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
        with tracking.stage_run("deploy", p.deploy.model_dump(), work):
            deploy.run(p, work)


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
        setup(work, args.params)
        (work / "params.yaml").write_text(json.dumps({"deploy": {"model_name": NAME}}))
        gp, mp = free_port(), free_port()
        log = (work / "servers.log").open("w")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "graftline.cli",
                    "serve",
                    "--port",
                    str(gp),
                    "--poll",
                    "0.5",
                    "--max-batch",
                    "256",
                ],
                cwd=work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "models",
                    "serve",
                    "-m",
                    f"models:/{NAME}/1",
                    "--env-manager",
                    "local",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(mp),
                ],
                cwd=work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        wait(f"http://127.0.0.1:{gp}/ready", procs[0])
        wait(f"http://127.0.0.1:{mp}/ping", procs[1])
        rng = np.random.default_rng(1)
        one = rng.integers(0, 255, (1, 1, 28, 28)).astype(float).tolist()
        batch = rng.integers(0, 255, (64, 1, 28, 28)).astype(float).tolist()
        g_url, m_url = f"http://127.0.0.1:{gp}/predict", f"http://127.0.0.1:{mp}/invocations"
        bodies = {
            n: json.dumps({"inputs": x}).encode() for n, x in (("one", one), ("batch", batch))
        }
        with httpx.Client(timeout=30) as c:
            for u in (g_url, m_url):  # warm-up
                latency(c, u, bodies["one"], 50)
                latency(c, u, bodies["batch"], 5)
            g_lat, m_lat = [], []
            for _ in range(4):  # interleaved blocks, so machine drift hits both
                g_lat.append(latency(c, g_url, bodies["one"], args.single // 4))
                m_lat.append(latency(c, m_url, bodies["one"], args.single // 4))
            g_lat, m_lat = np.concatenate(g_lat), np.concatenate(m_lat)
            g_b, m_b = [], []
            for _ in range(4):
                g_b.append(latency(c, g_url, bodies["batch"], args.batches // 4))
                m_b.append(latency(c, m_url, bodies["batch"], args.batches // 4))
            g_tp = 64 * 1000 / np.concatenate(g_b).mean()
            m_tp = 64 * 1000 / np.concatenate(m_b).mean()
        print(f"single image, {len(g_lat)} sequential requests each (ms):")
        print(
            f"  graftline  p50 {np.percentile(g_lat, 50):6.2f}  p99 {np.percentile(g_lat, 99):6.2f}"
        )
        print(
            f"  mlflow     p50 {np.percentile(m_lat, 50):6.2f}  p99 {np.percentile(m_lat, 99):6.2f}"
        )
        print(
            f"  ratio p50 graftline/mlflow: {np.percentile(g_lat, 50) / np.percentile(m_lat, 50):.2f} (target <= 1.0)"
        )
        print(f"batches of 64, {args.batches} sequential requests each (images/s):")
        print(
            f"  graftline {g_tp:8.0f}   mlflow {m_tp:8.0f}   ratio {g_tp / m_tp:.2f} (target >= 2.0)"
        )
        res = load_test(g_url, bodies["one"], args.load, args.concurrency, args.load // 2)
        print(
            f"load test: {args.load} single-image requests at concurrency {args.concurrency} "
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
