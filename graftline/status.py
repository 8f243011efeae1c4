"""``graftline status``: what is stale, what is live, what ran, where the servers are."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from pathlib import Path
from typing import Any

from graftline import processes, tracking


def dvc_stale(root: Path) -> dict[str, list[str]] | str:
    """The stages ``dvc status`` finds out of date, each with what changed; or why it could
    not tell."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo, contextlib.chdir(root):
            status = repo.status()
    except DvcException as err:
        return f"dvc status failed: {err}"
    stale: dict[str, list[str]] = {}
    for stage, changes in status.items():
        what: list[str] = []
        for change in changes:
            if isinstance(change, dict):
                for kind, items in change.items():
                    names = ", ".join(f"{k} ({v})" for k, v in items.items())
                    what.append(f"{kind}: {names}" if isinstance(items, dict) else str(kind))
            else:
                what.append(str(change))
        stale[stage.rpartition(":")[2]] = what
    return stale


def champion(model_name: str) -> dict[str, Any] | None:
    """The champion version with its test accuracy and since when, or None."""
    from graftline.registry import Registry

    reg = Registry(model_name)
    mv = reg.champion()
    if mv is None:
        return None
    version = str(mv.version)
    since = next((e for e in reversed(reg.history()) if e["version"] == version), None)
    accuracy = mv.tags.get("graftline.gate.challenger_accuracy")
    return {
        "model": model_name,
        "version": version,
        "accuracy": float(accuracy) if accuracy else None,
        "since": since["time"] if since else None,
        "how": since["action"] if since else None,
        "reason": since["reason"] if since else None,
        "git_commit": mv.tags.get("graftline.git_commit"),
    }


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def servers(serve_url: str) -> dict[str, Any]:
    """Where MLflow's store and the model service are, and whether the service answers."""
    uri = tracking.tracking_uri(".")
    serve = serve_url.rstrip("/")
    return {
        "mlflow": uri,
        "mlflow_ui": uri if uri.startswith("http") else "make mlflow-ui (http://127.0.0.1:5000)",
        "serve": serve,
        "serve_answers": _answers(f"{serve}/health"),
    }


def collect(root: Path, model_name: str, serve_url: str) -> dict[str, Any]:
    """Everything but Prefect's part (``flows.runs``), which the command adds."""
    tracking.configure(root)
    return {
        "dvc_stale": dvc_stale(root),
        "champion": champion(model_name),
        "pipeline_running": processes.holder(root / processes.PIPELINE_LOCK),
        "servers": servers(serve_url),
    }


def render(status: dict[str, Any]) -> str:
    """One screen for a person."""
    lines = []
    stale = status["dvc_stale"]
    if isinstance(stale, str):
        lines.append(f"data and models  {stale}")
    elif stale:
        lines.append(f"data and models  stale: {', '.join(stale)} (`dvc status`; `graftline run`)")
        for stage, what in stale.items():
            lines += [f"                   {stage}: {w}" for w in what[:3]]
    else:
        lines.append("data and models  up to date (dvc status)")
    ch = status["champion"]
    if ch is None:
        lines.append("champion         none yet")
    else:
        acc = f", test accuracy {ch['accuracy']:.4f}" if ch["accuracy"] is not None else ""
        since = f", since {ch['since']} ({ch['how']})" if ch["since"] else ""
        lines.append(f"champion         {ch['model']} v{ch['version']}{acc}{since}")
    running = status["pipeline_running"]
    lines.append(f"pipeline         {'running: ' + running if running else 'not running'}")
    prefect = status.get("prefect")
    if isinstance(prefect, str):
        lines.append(f"Prefect          {prefect}")
    elif prefect:
        last, nxt, sched = prefect["last_run"], prefect["next_run"], prefect["schedule"]
        lines.append(
            "last flow run    "
            + (f"{last['name']} {last['state']} at {last['time']}" if last else "none")
        )
        if sched:
            paused = " (paused)" if sched["paused"] else ""
            lines.append(
                f"schedule         {sched['deployment']} {', '.join(sched['crons'])}{paused}"
            )
        lines.append(
            "next run         " + (f"{nxt['time']} ({nxt['name']})" if nxt else "none scheduled")
        )
        lines.append(f"Prefect API      {prefect['api']}")
    srv = status["servers"]
    lines.append(f"MLflow           {srv['mlflow']}")
    state = "answering" if srv["serve_answers"] else "not answering (graftline serve)"
    lines.append(f"model service    {srv['serve']} {state}")
    return "\n".join(lines)


def to_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, default=str)
