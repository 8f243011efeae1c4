"""Wall time of the Prefect flow, cold and warm, against plain `dvc repro` on the same params,
in the same run; and the time spent in MLflow logging.

    python benchmarks/bench_flow.py [--tiny]

Each measurement uses a fresh temporary copy of the repo (cold = nothing computed yet).
The flow runs on Prefect's ephemeral local server, as `make run` does. Targets (issue 3):
the flow adds at most 15% to a cold run, and a warm (nothing changed) run takes under 15 s.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

import yaml
from _common import copy_repo, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import TINY_PARAMS


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny params")
    args = ap.parse_args()
    repos = []
    try:
        dvc_repo, flow_repo, bare_repo = copy_repo(), copy_repo(), copy_repo()
        repos += [dvc_repo, flow_repo, bare_repo]
        if args.tiny:
            for r in repos:
                (r / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
        t0 = time.perf_counter()
        run(["dvc", "repro"], dvc_repo)
        dvc_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        cold = run(["graftline", "run"], flow_repo)
        flow_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(["graftline", "run", "--no-deploy"], bare_repo)
        bare_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(["dvc", "repro"], dvc_repo)
        dvc_warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(["graftline", "run"], flow_repo)
        flow_warm = time.perf_counter() - t0
        logging_s = [
            float(x)
            for x in re.findall(
                r"logged to MLflow run \w+ in ([\d.]+) s", cold.stdout + cold.stderr
            )
        ]
        print(f"params: {'tiny (tests)' if args.tiny else 'default (params.yaml)'}")
        print(
            f"cold: dvc repro {dvc_cold:6.1f} s | flow {flow_cold:6.1f} s | "
            f"ratio {flow_cold / dvc_cold:.2f} (target <= 1.15; the flow also registers and gates)"
        )
        print(
            f"cold, flow without deploy (orchestration only): {bare_cold:6.1f} s | "
            f"ratio {bare_cold / dvc_cold:.2f}"
        )
        print(f"warm: dvc repro {dvc_warm:6.1f} s | flow {flow_warm:6.1f} s (target < 15 s)")
        print(
            f"MLflow logging inside the stages (metrics, curves, artifacts): "
            f"{sum(logging_s):.2f} s over {len(logging_s)} stage runs"
        )
    finally:
        for r in repos:
            shutil.rmtree(r, ignore_errors=True)


if __name__ == "__main__":
    main()
