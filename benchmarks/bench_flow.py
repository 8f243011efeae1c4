"""Wall time of the Prefect flow, cold and warm, against plain `dvc repro` on the same params,
in the same run; and the time spent in MLflow logging.

    python benchmarks/bench_flow.py [--tiny]

Each cold measurement uses a fresh temporary copy of the repo (nothing computed yet); cold
runs of `dvc repro` and of the flow alternate (--repeat pairs) and their medians are compared,
because this machine's speed drifts by +-10% over minutes.
The flow runs on the temporary Prefect server that `graftline run` (`make run`) starts, or with
--server on a running `prefect server start`. Targets (issue 3):
the flow adds at most 15% to a cold run, and a warm (nothing changed) run takes under 15 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import copy_repo, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import TINY_PARAMS, prefect_server


def _cold(cmd: list[str], tiny: bool) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of ``cmd`` in a fresh copy of the repo (nothing computed yet)."""
    repo = copy_repo()
    try:
        if tiny:
            (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
        t0 = time.perf_counter()
        proc = run(cmd, repo)
        return time.perf_counter() - t0, proc
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny params")
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="cold pairs (dvc repro, then the flow), interleaved so that the machine's drift "
        "hits both alike; medians are compared",
    )
    ap.add_argument("--bare", action="store_true", help="also time the flow without deploy")
    ap.add_argument(
        "--server",
        action="store_true",
        help="run the flow against a real `prefect server start` (as scheduled runs do) "
        "instead of Prefect's temporary server, which starts and stops with every run",
    )
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.server:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            os.environ["PREFECT_API_URL"] = stack.enter_context(prefect_server(home))
        else:
            os.environ.pop("PREFECT_API_URL", None)
        measure(args)


def measure(args: argparse.Namespace) -> None:
    dvc_cold: list[float] = []
    flow_cold: list[float] = []
    logging_s: list[float] = []
    for i in range(args.repeat):
        t, _ = _cold(["dvc", "repro"], args.tiny)
        dvc_cold.append(t)
        t, proc = _cold(["graftline", "run"], args.tiny)
        flow_cold.append(t)
        logging_s += [
            float(x)
            for x in re.findall(
                r"logged to MLflow run \w+ in ([\d.]+) s", proc.stdout + proc.stderr
            )
        ]
        print(
            f"pair {i + 1}: dvc repro {dvc_cold[-1]:6.1f} s | flow {flow_cold[-1]:6.1f} s | "
            f"ratio {flow_cold[-1] / dvc_cold[-1]:.2f}",
            flush=True,
        )
    bare = _cold(["graftline", "run", "--no-deploy"], args.tiny)[0] if args.bare else None

    warm_repo = copy_repo()
    try:
        if args.tiny:
            (warm_repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
        run(["graftline", "run"], warm_repo)
        flow_warm, dvc_warm = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            run(["dvc", "repro"], warm_repo)
            dvc_warm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run(["graftline", "run"], warm_repo)
            flow_warm.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(warm_repo, ignore_errors=True)

    med = statistics.median
    server = "a running `prefect server start`" if args.server else "its own temporary server"
    print(f"params: {'tiny (tests)' if args.tiny else 'default (params.yaml)'}; flow on {server}")
    print(
        f"cold, median of {args.repeat}: dvc repro {med(dvc_cold):6.1f} s | flow "
        f"{med(flow_cold):6.1f} s | ratio {med(flow_cold) / med(dvc_cold):.2f} "
        f"(target <= 1.15; the flow also logs, registers and gates the model)"
    )
    pairs = list(zip(flow_cold, dvc_cold, strict=True))
    ratios = [f / d for f, d in pairs]
    print(
        f"cold, per pair: ratios {' '.join(f'{r:.2f}' for r in ratios)} | median "
        f"{med(ratios):.2f} | the flow's extra seconds, median {med(f - d for f, d in pairs):.1f}"
    )
    if bare is not None:
        print(f"cold, flow without deploy: {bare:6.1f} s | ratio {bare / med(dvc_cold):.2f}")
    print(
        f"warm, median of {args.repeat}: dvc repro {med(dvc_warm):6.1f} s | flow "
        f"{med(flow_warm):6.1f} s (target < 15 s)"
    )
    print(
        f"MLflow logging inside the stages (metrics, curves, artifacts): "
        f"{sum(logging_s) / args.repeat:.2f} s per run"
    )


if __name__ == "__main__":
    main()
