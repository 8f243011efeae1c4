"""What a stage process costs before and after its work: `python -m tasks.distill` with
distillation off (it imports torch, MLflow, pandas, opens the MLflow store, logs a run, and
exits), as the stages start, against the same process with Python's collector as it comes
(on while importing, a full collection pass at exit), measured in the same run.

    python benchmarks/bench_stage_startup.py [--repeats 5]

Every DVC stage pays this once per run: a tiny `graftline run` has five stage processes.
Prints the median seconds of each and their ratio (reference / graftline's).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import copy_repo, env

# The reference: the same module run as the main program, but with gc.freeze a no-op and
# the collector left on while importing (tasks/__init__.py turns it off only under -m).
REFERENCE = (
    "import gc, runpy; gc.freeze = lambda: None; "
    "runpy.run_module('tasks.distill', run_name='__main__', alter_sys=True)"
)


def _seconds(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, env={**env(), "PYTHONPATH": str(cwd)}, capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5, help="runs of each, alternating")
    args = ap.parse_args()
    repo = copy_repo()
    stage = [sys.executable, "-m", "tasks.distill"]
    reference = [sys.executable, "-c", REFERENCE]
    _seconds(stage, repo)  # the first run creates mlflow.db and compiles bytecode
    times: dict[str, list[float]] = {"stage": [], "reference": []}
    for _ in range(args.repeats):
        times["stage"].append(_seconds(stage, repo))
        times["reference"].append(_seconds(reference, repo))
    ours, ref = (statistics.median(times[k]) for k in ("stage", "reference"))
    print(f"stage process (python -m tasks.distill): {ours:.2f} s (median of {args.repeats})")
    print(f"reference (collector as Python ships it): {ref:.2f} s")
    print(f"ratio reference/stage: {ref / ours:.2f}x; saved {ref - ours:.2f} s per stage")


if __name__ == "__main__":
    main()
