"""`graftline run` against the production stack and against the laptop defaults, same run.

    .venv/bin/python benchmarks/bench_stack.py [--repeats 2]

Production: an MLflow server on a throw-away PostgreSQL cluster with artifacts in S3 (moto's
server), started as tests/production does. Reference: the same pipeline on the default
`sqlite:///mlflow.db` and local artifacts. Both on the tests' tiny params, each run in a fresh
copy of the repo (every stage runs); prints the wall time of each and the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_PARAMS, make_repo, tool_env  # noqa: E402
from tests.production.conftest import mlflow_server_on, moto_s3, postgres_cluster  # noqa: E402

PARAMS = {**TINY_PARAMS, "deploy": {"model_name": "tiny-digits", "gate": {"min_accuracy": 0}}}


def timed_run(work: Path, tracking_uri: str | None) -> float:
    repo = make_repo(Path(tempfile.mkdtemp(dir=work)), PARAMS)
    env = tool_env(repo, PREFECT_HOME=str(repo / ".prefect-home"))
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "graftline.cli", "run"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graftline-bench-stack-"))
    with moto_s3(work) as s3, postgres_cluster() as pg:
        s3.bucket("bench")
        with mlflow_server_on(pg, "s3://bench/artifacts", work, s3.env()) as url:
            local, prod = [], []
            for _ in range(args.repeats):  # interleaved: drift in load hits both alike
                local.append(timed_run(work, None))
                prod.append(timed_run(work, url))
    lo, pr = min(local), min(prod)
    print(f"graftline run, tiny params, best of {args.repeats}")
    print(f"SQLite + local artifacts:             {lo:6.1f} s")
    print(f"MLflow server, PostgreSQL + S3 (moto): {pr:6.1f} s")
    print(f"ratio production/local: {pr / lo:.2f}")


if __name__ == "__main__":
    main()
