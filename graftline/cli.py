"""The ``graftline`` command.

The CLI is the application's entry point, above every layer: it may call the Prefect flows
(``run``, ``schedule``) and the stage tasks, which the library modules themselves never do;
those imports happen inside the commands, so importing this module loads none of them.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from graftline.config import ConfigError, Params, load_params, require_tracked_sections
from graftline.errors import GraftlineError
from graftline.layout import STAGES

if TYPE_CHECKING:
    from graftline.registry import Registry

DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00


def _registry(params_path: Path) -> tuple[Params, Registry]:
    from graftline import tracking
    from graftline.registry import Registry

    params = load_params(params_path)
    tracking.configure(".")
    return params, Registry(params.deploy.model_name)


def cmd_run(args: argparse.Namespace) -> int:
    load_params(args.params)  # a bad key fails here, before any server or store starts
    require_tracked_sections(args.params)
    from graftline import tracking

    tracking.check_reachable()  # and an absent tracking server too
    from flows.server import connect, start_unless_configured

    # Prefect's server starts first thing, so that its boot overlaps the imports and MLflow's
    # start-up below instead of following them (flows/server.py).
    server = start_unless_configured()
    from flows.pipeline import pipeline

    tracking.configure(".")  # creates the MLflow store on a first run
    if server is not None:
        print(f"graftline run: temporary Prefect server on {server.api_url}", file=sys.stderr)
        connect(server)
    started = time.monotonic()
    result = pipeline(
        root=".",
        params=str(args.params),
        deploy_model=not args.no_deploy,
        push_artifacts=args.push,
        until=args.until,
    )
    print(run_summary(result, time.monotonic() - started, temporary_server=server is not None))
    return 0


def run_summary(result: dict[str, Any], seconds: float, temporary_server: bool = False) -> str:
    """What `graftline run` did, in a few lines: stages run and skipped, test figures, the
    gate's decision, and where to look (MLflow, Prefect, DVC)."""
    from graftline import tracking

    def named(test: Callable[[dict[str, Any]], bool]) -> str:
        return ", ".join(s["stage"] for s in result["stages"] if test(s)) or "-"

    lines = [
        f"graftline run: done in {seconds:.0f} s",
        f"  stages    ran: {named(lambda s: s['ran'])}; "
        f"from DVC's run cache: {named(lambda s: s.get('cached', False))}; "
        f"unchanged: {named(lambda s: not s['ran'] and not s.get('cached'))}",
    ]
    from graftline.evaluate import MODEL_NAMES

    for name in MODEL_NAMES:
        m = result["metrics"].get(name)
        if m:
            lines.append(
                f"  {name:9s} test accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                f"ECE {m['ece']:.4f}"
            )
    d = result.get("deploy")
    if d is None:
        until = result.get("until", "evaluate")
        why = "--no-deploy" if until == "evaluate" else f"--until {until}"
        lines.append(f"  gate      not run ({why})")
    elif d.get("skipped"):
        lines.append(f"  gate      model unchanged since v{d['version']}; nothing registered")
    else:
        verdict = "promoted to champion" if d["promoted"] else "not promoted"
        lines.append(f"  gate      v{d['version']} {verdict}: {d['reason']}")
    uri = tracking.tracking_uri(".")
    run_id, exp_id = result["mlflow_run_id"], result.get("mlflow_experiment_id", "0")
    if uri.startswith("http"):
        lines.append(f"  MLflow    {uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}")
    else:
        lines.append(f"  MLflow    run {run_id} in {uri} (`make mlflow-ui` to browse)")
    fr = result.get("flow_run") or {}
    where = fr.get("url") or fr.get("id", "")
    note = " (gone with the temporary server; set PREFECT_API_URL to keep it)" * temporary_server
    lines.append(f"  Prefect   flow run {fr.get('name', '')} {where}{note}")
    lines.append(f"  DVC       {_lock_status()}")
    return "\n".join(lines)


def _lock_status() -> str:
    """Whether the run changed dvc.lock, which git should then record (DVC's advice, once)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "dvc.lock"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "dvc.lock written (git unavailable to compare)"
    if out.returncode != 0:
        return "dvc.lock written (not a git checkout)"
    if out.stdout.strip():
        return "dvc.lock changed: record it with `git add dvc.lock && git commit`"
    return "dvc.lock matches git: nothing to commit"


def cmd_promote(args: argparse.Namespace) -> int:
    from graftline import layout
    from graftline.data.store import load_split
    from graftline.registry import challenge

    params, reg = _registry(args.params)
    version = str(args.version)
    reg.version(version)
    expected = reg.champion_version()
    if args.force:
        reason = f"forced by hand: {args.reason}" if args.reason else "forced by hand"
    else:
        # The gate deploy applies, on the same test split, through the same library code.
        test = load_split(layout.TASK_DATA, "test")
        truth = [test.classes[i] for i in test.labels]
        uri = f"models:/{reg.name}/{version}"
        scored = challenge(reg.name, uri, expected, test.images, truth)
        decision = scored.decide(**params.deploy.gate.model_dump())
        if not decision.passed:
            print(f"graftline promote: refused: v{version} {decision.reason}", file=sys.stderr)
            return 2
        reason = f"by hand: {decision.reason}"
    event = reg.promote(version, expected_champion=expected, reason=reason)
    print(f"champion of {reg.name}: v{event['previous'] or '-'} -> v{version} ({reason})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    _, reg = _registry(args.params)
    event = reg.rollback(args.reason)
    print(f"champion of {reg.name}: v{event['previous']} -> v{event['version']} (rollback)")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    _, reg = _registry(args.params)
    events = reg.history()
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    if not events:
        print(f"{reg.name}: no champion yet")
        return 0
    print(f"{'time (UTC)':20s} {'action':9s} {'champion':>8s} {'was':>5s}  reason")
    for e in events:
        was = f"v{e['previous']}" if e["previous"] else "-"
        print(f"{e['time']:20s} {e['action']:9s} {'v' + e['version']:>8s} {was:>5s}  {e['reason']}")
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str) -> timedelta:
    """``--every``: seconds, or a number with a unit (``90``, ``30s``, ``10m``, ``6h``, ``1d``)."""
    value, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(value) * _UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive duration (seconds, or with a unit: 30s, 10m, 6h, 1d)"
        )
    return timedelta(seconds=seconds)


def _check_schedule(cron: str, timezone: str) -> None:
    """A bad cron expression or time zone fails before any server starts."""
    import zoneinfo

    from prefect.schedules import Cron

    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise GraftlineError(f"--timezone: unknown time zone {timezone!r}") from None
    try:
        Cron(cron, timezone=timezone)
    except ValueError as err:
        raise GraftlineError(f"--cron: {err}") from None


def cmd_reproduce(args: argparse.Namespace) -> int:
    from graftline.reproduce import reproduce

    _, reg = _registry(args.params)
    version = str(args.version)
    report = reproduce(
        ".", reg.name, version, log=lambda m: print(f"reproduce: {m}"), keep=args.keep
    )
    print(report.text())
    return report.exit_code


def cmd_schedule(args: argparse.Namespace) -> int:
    load_params(args.params)  # a bad key fails here, before any server starts
    _check_schedule(args.cron, args.timezone)
    from flows.server import SERVER_LOG, connect, start_unless_configured
    from graftline import processes, tracking

    tracking.check_reachable()

    # Orphaned descendants (a stage whose flow process died) become this process's children,
    # so that none outlives it.
    processes.become_subreaper()
    # A cron schedule needs Prefect's scheduler service: with no server configured, run a
    # full one (what `prefect server start` runs) for as long as this command runs.
    server = start_unless_configured(services=True, port=args.server_port, log=SERVER_LOG)
    from flows.schedule import serve_retraining

    if server is not None:
        connect(server)
        print(
            f"graftline schedule: Prefect server with its scheduler on {server.api_url} "
            f"(UI: {server.ui_url}, log: {SERVER_LOG}); it stops with this command",
            file=sys.stderr,
        )
    try:
        serve_retraining(
            cron=args.cron,
            name=args.name,
            params=str(args.params),
            timezone=args.timezone,
            every=args.every,
        )
    finally:
        # Anything a cancelled run left behind; the server stops last, at exit, once
        # Prefect's exit handlers have sent their final logs to it.
        processes.stop_descendants(exclude={server.process_id} if server else None)
    print("graftline schedule: stopped", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from graftline import status

    params = load_params(args.params)
    state = status.collect(Path("."), params.deploy.model_name, args.serve_url)
    state["prefect"] = _prefect_status()
    print(status.to_json(state) if args.json else status.render(state))
    return 0


def _prefect_status() -> dict[str, Any] | str:
    """The pipeline's runs from the configured Prefect server, or from this checkout's own
    Prefect database through a temporary server (what `graftline run` records into)."""
    from flows.server import connect, start_unless_configured

    server = start_unless_configured()
    try:
        if server is not None:
            connect(server)
        from flows.runs import pipeline_runs

        runs = pipeline_runs()
        if server is not None:  # its links die with it
            for run in (runs["last_run"], runs["next_run"]):
                if run:
                    run["url"] = None
        api = os.environ.get("PREFECT_API_URL", "")
        runs["api"] = (
            f"none configured; read {os.environ.get('PREFECT_HOME', '~/.prefect')} "
            "through a temporary server"
            if server is not None
            else api or "from the Prefect profile"
        )
        return runs
    except Exception as err:  # status reports what it cannot reach, it does not fail on it
        return f"unavailable ({type(err).__name__}: {str(err)[:200]})"
    finally:
        if server is not None:
            server.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    from graftline import tracking
    from graftline.serve.app import serve

    params = load_params(args.params)
    tracking.configure(".")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not _token_set():
        print(
            "graftline serve: warning: listening beyond loopback without GRAFTLINE_API_TOKEN",
            file=sys.stderr,
        )
    serve(
        params.deploy.model_name,
        host=args.host,
        port=args.port,
        poll_seconds=args.poll,
        max_batch=args.max_batch,
        max_bytes=args.max_bytes,
        runtime=args.runtime,
    )
    return 0


def _token_set() -> bool:
    return bool(os.environ.get("GRAFTLINE_API_TOKEN"))


def cmd_predict(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from graftline.serve.batch import predict_batch, read_inputs, read_texts, summary
    from graftline.serve.champion import load_version

    _, reg = _registry(args.params)
    version = args.version or reg.champion_version()
    if version is None:
        raise GraftlineError(f"model {reg.name!r} has no champion; pass --version")
    reg.version(version)
    loaded = load_version(MlflowClient(), reg.name, str(version), args.runtime)
    if loaded.text:
        ids, inputs = read_texts(args.input, args.text_column)
    else:
        ids, inputs = read_inputs(args.input, loaded.input_shape, loaded.transform)
    result = predict_batch(loaded, ids, inputs, args.out)
    print(
        f"{args.out}: {summary(result)['items']} predictions by {reg.name} v{version} "
        f"({args.runtime})"
    )
    return 0


def _runtime_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: the checkpoint on PyTorch (default); onnx: the version's model.onnx on "
        "ONNX Runtime (CPU, or CUDA where present), the same input transform or tokenizer",
    )


# add_parser for a subcommand, with the options every command shares
Command = Callable[..., argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="graftline",
        description="Pretrain, fine-tune, evaluate and deploy models reproducibly.",
    )
    ap.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="parameters file (default: params.yaml). For `run` and `schedule`, another file "
        "(a preset such as params/vit-mae.yaml) becomes params.yaml, which DVC's stages read",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --params may also follow the command (`graftline run --params FILE`, as the README
    # writes it); there it overrides the one before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--params", type=Path, default=argparse.SUPPRESS, help="as --params before COMMAND"
    )

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    _pipeline_commands(command)
    _registry_commands(command)
    _serving_commands(command)
    return ap


def _pipeline_commands(command: Command) -> None:
    """run, reproduce, schedule."""
    p = command("run", help="run the pipeline as a Prefect flow, then gate and deploy")
    p.add_argument("--no-deploy", action="store_true", help="stop after evaluate")
    p.add_argument(
        "--until",
        choices=STAGES,
        metavar="STAGE",
        help="stop after this stage, no gate or deploy (" + ", ".join(STAGES) + ")",
    )
    p.add_argument("--push", action="store_true", help="dvc push data and models afterwards")
    p.set_defaults(func=cmd_run)

    p = command(
        "reproduce",
        help="rebuild a registered version from its lineage and compare the weights",
        description="Check out the version's git commit in a fresh worktree, bring its data "
        "from the DVC cache or remote, run the pipeline up to finetune from scratch, and "
        "compare data hashes, params and weights with what was registered. Rebuilt where "
        "the kernels differ (another CPU capability, torch version or device than the "
        "version's graftline.env.* tags), bits cannot match: the weights are then compared "
        "within a tolerance and the test accuracies within their 95% interval. Exit 0 when "
        "bit-identical, 3 when equivalent (another environment, within tolerance), 1 when "
        "something differs (the report says what), 2 when the version, its commit or its "
        "data cannot be found.",
    )
    p.add_argument("version", help="registered model version number")
    p.add_argument("--keep", action="store_true", help="keep the worktree for a closer look")
    p.set_defaults(func=cmd_reproduce)

    p = command(
        "schedule",
        help="retrain on a cron schedule (or --every): serve the Prefect deployment until stopped",
        description="Serve the deployment graftline-pipeline/scheduled-retraining: at every "
        "cron time the pipeline runs (retrain, gate, promote, push), one run at a time. "
        "Without PREFECT_API_URL a Prefect server with its scheduler runs beside it and stops "
        "with it. Ctrl-C or SIGTERM stops it, and a run in progress; the schedule stays on.",
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r})"
    )
    when.add_argument(
        "--every",
        type=parse_every,
        metavar="DURATION",
        help="instead of a cron schedule, retrain at this interval from now: seconds, or "
        "30s, 10m, 6h, 1d",
    )
    p.add_argument(
        "--timezone", default="UTC", help="IANA time zone of the cron times (default: UTC)"
    )
    p.add_argument("--name", default="scheduled-retraining", help="deployment name")
    p.add_argument(
        "--server-port",
        type=int,
        help="port of the Prefect server (API and UI) it starts when PREFECT_API_URL is "
        "unset (default: a free port)",
    )
    p.set_defaults(func=cmd_schedule)


def _registry_commands(command: Command) -> None:
    """promote, rollback, history, status."""
    p = command("promote", help="make VERSION the champion (through the gate unless --force)")
    p.add_argument("version", help="registered model version number")
    p.add_argument("--force", action="store_true", help="skip the gate (never the race check)")
    p.add_argument("--reason", default="", help="why, recorded in the history")
    p.set_defaults(func=cmd_promote)

    p = command("rollback", help="put back the champion the current one replaced")
    p.add_argument("--reason", default="manual rollback", help="why, recorded in the history")
    p.set_defaults(func=cmd_rollback)

    p = command("history", help="champions over time, with reasons")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_history)

    p = command(
        "status",
        help="one screen: what is stale, the champion, the last and next flow run, the servers",
        description="What DVC finds stale, which version is champion (accuracy, since when), "
        "whether a pipeline is running, the last flow run and its state, the next scheduled "
        "run, and where MLflow and the model service are.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--serve-url",
        default="http://127.0.0.1:8000",
        help="the model service to check (default: graftline serve's http://127.0.0.1:8000)",
    )
    p.set_defaults(func=cmd_status)


def _serving_commands(command: Command) -> None:
    """serve, predict."""
    p = command("serve", help="HTTP service and web page for the champion (follows the alias)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--poll", type=float, default=2.0, help="seconds between alias checks")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch per request")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=5 * 1024 * 1024,
        help="largest request body or uploaded file, in bytes",
    )
    _runtime_option(p)
    p.set_defaults(func=cmd_serve)

    p = command("predict", help="batch prediction: images or texts in, a CSV of answers out")
    p.add_argument(
        "input",
        type=Path,
        help="image models: a folder of images or a CSV of pixel columns; text models: a "
        ".txt file (a text per line) or a CSV, JSONL or Parquet table",
    )
    p.add_argument(
        "--text-column", default="text", help="text models: the table's text column (text)"
    )
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="output CSV")
    p.add_argument("--version", help="registered version (default: the champion)")
    _runtime_option(p)
    p.set_defaults(func=cmd_predict)


class ConsoleFormatter(logging.Formatter):
    """One line per event: the time, who speaks (the Prefect task, i.e. the stage, or the
    flow, or the logger), and the message; the level only when it is not INFO."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        who = getattr(record, "task_name", None) or (
            "flow" if record.name == "prefect.flow_runs" else record.name
        )
        who = who.removeprefix("graftline.")
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        line = f"{self.formatTime(record, self.datefmt)} {who:<10s} {level}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_console(verbose: bool = False) -> None:
    """The console of every command: our formatter on the root logger, and quiet libraries.

    Unless ``verbose``: no line per Prefect API call (httpx logs each at INFO), no MLflow
    INFO lines (database set-up, input-example validation) and no artifact download bars.
    The stage processes inherit the environment, so they are as quiet.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # graftline's own lines in a flow run (the deploy decision) go to its Prefect log too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "graftline")
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, GraftlineError) as err:
        print(f"graftline {args.command}: error: {err}", file=sys.stderr)
        return 2


def entry_point() -> NoReturn:
    """The ``graftline`` program: ``main``, then exit."""
    code = main()
    # Out of the collector's reach with everything else: the interpreter's exit then skips
    # its full collections over the ~430k objects that torch, MLflow and Prefect leave
    # (~1.1 s of every `graftline run`, measured on 2 cores).
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
