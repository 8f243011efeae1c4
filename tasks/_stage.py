"""What every stage entry point shares: logging set-up and turning input errors into exits."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from graftline import distributed, tracking
from graftline.config import ConfigError, Params, load_params
from graftline.errors import GraftlineError

log = logging.getLogger("graftline")

# Set by the Prefect flow, which runs DVC in its own process: a file that receives this stage's
# stdout and stderr, which the flow follows into the Prefect log.
STAGE_LOG_ENV = "GRAFTLINE_STAGE_LOG"


def _output_to_stage_log() -> None:
    path = os.environ.get(STAGE_LOG_ENV)
    if not path:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, sys.stdout.fileno())
    os.dup2(fd, sys.stderr.fileno())
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)


# What DVC may run a stage's command through (``$SHELL -c``, or ``/bin/sh -c`` when SHELL is
# unset). bash execs a lone command, dash does not: the stage's parent is then the shell.
_SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish"}


def _owner() -> psutil.Process | None:
    """The process this stage works for: its parent, or the parent's parent when the parent
    is only the shell that DVC ran the command through."""
    try:
        parent = psutil.Process().parent()
        if parent is not None and parent.name() in _SHELLS:
            parent = parent.parent() or parent
    except psutil.Error:
        return None
    return parent


def _watch(owner: psutil.Process, every: float = 0.5) -> None:
    while owner.is_running():  # compares the start time too: a reused pid is not the owner
        time.sleep(every)
    os.kill(os.getpid(), signal.SIGTERM)


def _stop_with_parent() -> None:
    """Stop (SIGTERM) when the process that started this stage dies (``kill -9`` of the
    flow or of ``dvc repro``): a stage never trains on for nobody.

    Linux sends the signal at once when the parent dies (``PR_SET_PDEATHSIG``). When DVC ran
    the command through a shell that stays (dash), the parent is that shell, which outlives
    the flow; a watcher thread then follows the shell's parent too.
    """
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGTERM)
        return
    owner = _owner()
    if owner is not None and owner.pid != os.getppid():
        threading.Thread(target=_watch, args=(owner,), name="owner-watch", daemon=True).start()


class _Bare(logging.Formatter):
    """The message, with its level when it is not INFO."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"


class _Timed(_Bare):
    """The time too: what `dvc repro` prints of a stage."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.formatTime(record, '%H:%M:%S')} {super().format(record)}"


# How long a stopped stage may take to close its MLflow run before it exits regardless.
CLEANUP_SECONDS = 60.0


def _quiet_about_late_signals(unraisable: Any) -> None:
    """``sys.unraisablehook`` once the stage is stopping. A signal whose C handler ran just
    before the switch to ``SIG_IGN`` reaches the Python side afterwards, where CPython reports
    it as "Signal 15 ignored due to race condition" with a traceback: that one is expected
    and dropped; anything else is reported as usual."""
    err = unraisable.exc_value
    if isinstance(err, OSError) and "ignored due to race condition" in str(err):
        return
    sys.__unraisablehook__(unraisable)


def _interrupt(signum: int, _frame: Any) -> None:
    """The first SIGTERM or SIGINT interrupts the stage; later ones are ignored, so that they
    cannot interrupt the clean-up that closes its MLflow run as KILLED. Stopping the stage
    often signals it twice: the flow stops the stage and the shell DVC ran it through, whose
    death sends ``PR_SET_PDEATHSIG``; a signal to the process group adds one more. A
    watchdog ends the process if the clean-up hangs.

    ``SIG_IGN``, not a Python handler that does nothing: at exit CPython resets Python
    handlers to ``SIG_DFL``, and a signal then would kill the process mid-exit."""
    sys.unraisablehook = _quiet_about_late_signals
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    watchdog = threading.Timer(CLEANUP_SECONDS, os._exit, args=(128 + signum,))
    watchdog.daemon = True
    watchdog.start()
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def stage_main(name: str, run: Callable[[Params], Any], argv: list[str] | None = None) -> int:
    """Parse ``--params``, run the stage, and exit 2 with a one-line reason on bad input.

    SIGTERM (a cancelled flow run, a scheduler stopping) interrupts the stage as Ctrl-C does,
    so that its MLflow run ends as KILLED instead of staying RUNNING.
    """
    # What the stage module imported lives as long as the process: out of the collector's
    # reach (tasks/__init__.py kept the collector off while it was imported).
    gc.freeze()
    gc.enable()
    try:
        return _stage_main(name, run, argv)
    finally:
        # The same for what the run made: the interpreter's exit then skips its collections
        # over the whole heap (~1.2 s of every stage process, 2 cores; as graftline.cli).
        gc.freeze()


def _stage_main(name: str, run: Callable[[Params], Any], argv: list[str] | None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    _stop_with_parent()
    _output_to_stage_log()
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=run.__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    # Under the flow, each line gets its time and the stage's name there (graftline.cli).
    handler.setFormatter(_Bare() if os.environ.get(STAGE_LOG_ENV) else _Timed())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        return _dispatch(name, run, args.params)
    except KeyboardInterrupt as stop:  # its MLflow run is closed KILLED by now
        print(f"graftline {name}: {stop or 'interrupted'}", file=sys.stderr)
        return 130


def _dispatch(name: str, run: Callable[[Params], Any], params_path: Path) -> int:
    try:
        params = load_params(params_path)
    except ConfigError as err:
        print(f"graftline {name}: error: {err}", file=sys.stderr)
        return 2
    train_cfg = getattr(getattr(params, name), "train", None)
    # Kernels pinned before the first one runs (train.portable; evaluate's inference too,
    # so that its figures are the same bits everywhere).
    if (train_cfg is None or train_cfg.portable) and name != "preprocess":
        _portable_or_restart(name, params_path)
    ranks = train_cfg.distributed.nproc_per_node if train_cfg is not None else 1
    if ranks > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(name, ranks, params_path)
    if distributed.init_from_env():
        try:
            return _rank_main(name, run, params)
        finally:
            distributed.shutdown()
    return _main(name, run, params)


def _portable_or_restart(name: str, params_path: Path) -> None:
    """Pin the kernels (``graftline.train.portable_kernels``); if a kernel already ran at
    another level in this process, start the stage anew with the settings in place."""
    from graftline.train import PORTABLE_KERNELS, portable_kernels

    already = all(os.environ.get(k) == v for k, v in PORTABLE_KERNELS.items())
    if portable_kernels() or already:
        return
    log.info("%s: restarting with portable kernels (train.portable)", name)
    argv = [sys.executable, "-m", f"tasks.{name}", "--params", str(params_path)]
    os.execve(sys.executable, argv, os.environ)


# `python -m torch.distributed.run`, stopped by SIGTERM when its parent (the stage) dies. On
# SIGTERM its agent stops the ranks, then re-raises the signal as an exception, whose
# traceback says nothing that "stopped" does not: it exits 143 instead.
_TORCHRUN = """
import ctypes, runpy, signal, sys
from torch.distributed.elastic.multiprocessing.api import SignalException
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
sys.argv[0] = "torchrun"
try:
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
except SignalException as stop:
    sys.exit(128 + int(stop.sigval))
"""


def _launch(name: str, ranks: int, params_path: Path) -> int:
    """This stage again, as ``ranks`` processes under ``torchrun`` on this node (a free
    loopback port for the rendezvous); returns its exit status. torchrun stops every rank
    when one fails, and prints which one and why."""
    import subprocess

    log.info("%s: starting %d ranks under torchrun", name, ranks)
    # torchrun runs in its own session, so that a signal to this stage's process group
    # reaches it once, from here: a second SIGTERM while its agent stops the ranks makes it
    # print a traceback. It still dies with this process (PR_SET_PDEATHSIG, set before it
    # starts, by the snippet below).
    cmd = [sys.executable, "-c", _TORCHRUN, "--standalone", f"--nproc_per_node={ranks}"]
    cmd += ["-m", f"tasks.{name}", "--params", str(params_path)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C: torchrun stops the ranks, then we go
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"graftline {name}: stopped", file=sys.stderr)
        return 130
    if code:
        print(f"graftline {name}: error: a rank failed (torchrun exit {code})", file=sys.stderr)
    return 2 if code else 0


def _rank_main(name: str, run: Callable[[Params], Any], params: Params) -> int:
    """One rank under torchrun: rank 0 runs the stage as a single process would (MLflow run,
    outputs, log); the others train beside it, quietly, and write nothing."""
    if distributed.is_main():
        log.info(
            "%s: world_size=%d (torchrun, %s)",
            name,
            distributed.world_size(),
            distributed.backend(),
        )
        return _main(name, run, params)
    logging.getLogger().setLevel(logging.WARNING)
    # This rank owns no MLflow run and writes nothing: SIGTERM ends it at once, even while it
    # waits in a collective (where a Python handler would only run once that returns).
    # Rank 0, whose peer is then gone, fails out of its own wait and closes its run.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        run(params)
    except GraftlineError as err:
        print(f"graftline {name}: error (rank {distributed.rank()}): {err}", file=sys.stderr)
        return 2
    return 0


def _main(name: str, run: Callable[[Params], Any], params: Params) -> int:
    # Every stage run is recorded in MLflow, under `dvc repro` as under the Prefect flow.
    with tracking.stage_run(name, getattr(params, name).model_dump()) as mlrun:
        try:
            result = run(params)
        except GraftlineError as err:
            import mlflow

            mlflow.set_tag("graftline.error", str(err)[:5000])
            mlflow.end_run(status="FAILED")
            print(f"graftline {name}: error: {err}", file=sys.stderr)
            return 2
        seconds = tracking.log_result(result or {})
        log.info("%s: logged to MLflow run %s in %.2f s", name, mlrun.info.run_id, seconds)
    return 0
