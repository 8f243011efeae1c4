"""Rebuild a registered model version from its lineage tags alone, and compare.

A version carries the git commit it was made from and the ``dvc.lock`` hashes of its data,
backbone and weights (``graftline.tracking.lineage_tags``), and its params. ``reproduce``
checks that commit out in a fresh git worktree, brings its DVC-tracked inputs from the cache
or the remote, runs the pipeline up to ``finetune`` (``distill`` when on) from scratch (no run-cache, every stage
forced), and compares what it rebuilt with what was registered: data and backbone hashes,
params, and the weights, byte for byte. Nothing in the checkout or its tracking store changes:
the rebuild logs to a store of its own inside the worktree, which is removed afterwards.

Bits can match only where the kernels are the same: a version records the environment its
training ran in (torch version, CPU capability, device, CPU model: ``graftline.env.*``).
Rebuilt in another, with other bytes, the weights are compared within a tolerance and the
test figures within their confidence interval instead, and the verdict says ``equivalent``
or ``different``, naming both environments. Exit codes of ``graftline reproduce``: 0 bit-identical, 3 equivalent (other
environment), 1 not identical or different, 2 an error (version, commit or data not found).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from graftline.config import load_params
from graftline.errors import GraftlineError

# What the rebuild must match: (what, lineage tag, stage and out in the rebuilt dvc.lock).
HASHED = [
    ("task data", "graftline.dvc.task_data", ("preprocess", "data/processed/task")),
    ("pretraining data", "graftline.dvc.pretrain_data", ("preprocess", "data/processed/pretrain")),
    ("pretrained backbone", "graftline.dvc.pretrained_backbone", ("pretrain", "models/pretrained")),
    ("fine-tuned model", "graftline.dvc.finetuned_model", ("finetune", "models/finetuned")),
    ("student model", "graftline.dvc.student_model", ("distill", "models/student")),
]


@dataclass
class Check:
    what: str
    registered: str
    rebuilt: str
    passed: bool | None = None  # a comparison within a tolerance; else: equal strings

    @property
    def ok(self) -> bool:
        return self.passed if self.passed is not None else self.registered == self.rebuilt


ENV_KEYS = ("torch", "cpu_capability", "device", "cpu")
# Rebuilt under other kernels, each tensor may differ by this share of its norm: float32 sums
# in another order differ by ~1e-7 relative per op, and training compounds that over its steps;
# a bug (a wrong seed, other data, a changed layer) moves weights by tens of per cent. The test
# that rebuilds under ATEN_CPU_CAPABILITY=default prints the largest difference it finds.
RELATIVE_TOLERANCE = 0.02


@dataclass
class Report:
    name: str
    version: str
    commit: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Registered and rebuilt environments, where they differ; then these checks replace the
    # byte comparison of the models.
    environments: tuple[str, str] | None = None
    equivalence: list[Check] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.environments is None and all(c.ok for c in self.checks)

    @property
    def verdict(self) -> str:
        if self.environments is None:
            return "bit-identical" if self.identical else "NOT identical"
        ok = all(c.ok for c in self.checks) and all(c.ok for c in self.equivalence)
        return "equivalent" if ok else "different"

    @property
    def exit_code(self) -> int:
        return {"bit-identical": 0, "equivalent": 3}.get(self.verdict, 1)

    def text(self) -> str:
        lines = [f"{self.name} v{self.version} from commit {self.commit}:"]
        for c in self.checks:
            mark = "same" if c.ok else "DIFFERS"
            detail = c.rebuilt if c.ok else f"registered {c.registered}, rebuilt {c.rebuilt}"
            lines.append(f"  {c.what:20s} {mark:8s} {detail}")
        for c in self.equivalence:
            mark = "within" if c.ok else "OUTSIDE"
            lines.append(f"  {c.what:20s} {mark:8s} {c.rebuilt}")
        lines += [f"  note: {n}" for n in self.notes]
        where = ""
        if self.environments is not None:
            where = f" (registered on {self.environments[0]}, rebuilt on {self.environments[1]})"
        lines.append(f"{self.name} v{self.version}: {self.verdict}{where}")
        return "\n".join(lines)


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GraftlineError(f"`{' '.join(cmd)}` failed in {cwd}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lock_md5(lock: dict, stage: str, out: str) -> str:
    for o in lock.get("stages", {}).get(stage, {}).get("outs", []):
        if o.get("path") == out:
            return str(o.get("md5", ""))
    return "(absent)"


def _params_diff(registered: str, rebuilt: dict) -> str:
    """``same`` or the keys whose values differ."""
    try:
        before = json.loads(registered)
    except json.JSONDecodeError:  # truncated tag: compare what it holds
        return "same" if json.dumps(rebuilt, sort_keys=True).startswith(registered) else "differ"

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out |= flat(v, key + ".") if isinstance(v, dict) else {key: v}
        return out

    a, b = flat(before), flat(rebuilt)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return "same" if not keys else "differ: " + ", ".join(keys[:10])


def reproduce(
    root: Path | str,
    name: str,
    version: str,
    log: Callable[[str], None] = print,
    keep: bool = False,
) -> Report:
    """Rebuild ``name`` v``version`` from its lineage and compare; see the module's doc.

    Raises:
        GraftlineError: the version, its commit or its data cannot be found.
    """
    root = Path(root).resolve()
    tags, report, registered_ckpt = _registered(root, name, version)
    commit = report.commit.removesuffix("-dirty")
    work = Path(tempfile.mkdtemp(prefix=f"graftline-reproduce-{name}-v{version}-"))
    tree = work / "tree"
    log(f"checking out {commit} in {tree}")
    _run(["git", "worktree", "add", "--detach", str(tree), commit], root)
    try:
        env = _prepare_tree(root, tree, work, f"{name} v{version}", log)
        # The registered model is the student when that commit's params distil, else the
        # fine-tuned model.
        distilled = load_params(tree / "params.yaml").distill.enabled
        target = "distill" if distilled else "finetune"
        log(f"running the pipeline up to {target} from scratch (dvc repro --force)")
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "--force", "--no-run-cache", target],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise GraftlineError(
                f"rebuilding {name} v{version} failed:\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        _compare(report, tags, tree, registered_ckpt, distilled)
    finally:
        if keep:
            log(f"kept the worktree: {tree}")
        else:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root)
            shutil.rmtree(work, ignore_errors=True)
    return report


def _registered(root: Path, name: str, version: str) -> tuple[dict[str, str], Report, Path]:
    """The version's tags, an empty report naming its commit, and its registered checkpoint
    (downloaded), after checking that ``root``'s repository has that commit."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = MlflowClient().get_model_version(name, version)
    except MlflowException:
        raise GraftlineError(f"model {name!r} has no version {version}") from None
    tags = dict(mv.tags)
    commit_tag = tags.get("graftline.git_commit", "")
    if not commit_tag or commit_tag == "unknown":
        raise GraftlineError(f"{name} v{version} has no lineage commit (tag graftline.git_commit)")
    commit = commit_tag.removesuffix("-dirty")
    report = Report(name, version, commit_tag)
    if commit_tag.endswith("-dirty"):
        report.notes.append(
            "it was made from uncommitted changes; the rebuild uses the commit as it is"
        )
    have = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True
    )
    if have.returncode != 0:
        raise GraftlineError(
            f"{name} v{version} was made from commit {commit}, which this repository does not "
            "have (fetch it, or the history was rewritten)"
        )
    # The registered weights, before any work.
    registered_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    found = sorted(registered_dir.rglob("model.pt"))
    if not found:
        raise GraftlineError(f"models:/{name}/{version} has no checkpoint artifact")
    return tags, report, found[0]


def _prepare_tree(
    root: Path, tree: Path, work: Path, what: str, log: Callable[[str], None]
) -> dict[str, str]:
    """Give the worktree ``root``'s DVC remotes and cache and its DVC-tracked inputs; returns
    the environment of the rebuild (its own MLflow store in ``work``, no parent run)."""
    # The checkout's DVC remotes and cache: the local config is not in git.
    if (root / ".dvc" / "config.local").exists():
        shutil.copy2(root / ".dvc" / "config.local", tree / ".dvc" / "config.local")
    dvc = [sys.executable, "-m", "dvc"]
    cache = _run([*dvc, "cache", "dir"], root).strip()
    _run([*dvc, "config", "--local", "cache.dir", cache], tree)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
    }
    for key in ("GRAFTLINE_PARENT_RUN_ID", "GRAFTLINE_FLOW_RUN_ID", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    tracked = _run(["git", "ls-files", "*.dvc", "**/*.dvc"], tree).split()
    if tracked:
        log(f"fetching {len(tracked)} DVC-tracked input(s) from the cache or the remote")
        proc = subprocess.run(
            [*dvc, "pull", *tracked], cwd=tree, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise GraftlineError(
                f"the data of {what} is in neither the DVC cache nor the "
                f"remote ({', '.join(tracked)}):\n{proc.stderr.strip()[-2000:]}"
            )
    return env


def _compare(
    report: Report, tags: dict[str, str], tree: Path, registered_ckpt: Path, distilled: bool
) -> None:
    """Fill ``report`` with the rebuilt tree's hashes, params and weights against the
    version's: bytes in the same environment, within tolerance in another."""
    folder = "student" if distilled else "finetuned"
    lock = yaml.safe_load((tree / "dvc.lock").read_text())
    rebuilt_env = _environment(tree / ".graftline" / "environment" / f"{folder}.json")
    rebuilt = tree / "models" / folder / "model.pt"
    digests = _sha256(registered_ckpt), _sha256(rebuilt)
    report.environments = other_environments(tags, rebuilt_env, digests[0] == digests[1])
    for what, tag, (stage, out) in HASHED:
        if tag in tags and (stage != "distill" or distilled):
            if report.environments and stage != "preprocess":
                continue  # models: compared within tolerance below, not by their bytes
            report.checks.append(Check(what, tags[tag], _lock_md5(lock, stage, out)))
    if "graftline.params" in tags:
        params = load_params(tree / "params.yaml").model_dump(mode="json")
        report.checks.append(
            Check("params", "same", _params_diff(tags["graftline.params"], params))
        )
    if report.environments:
        report.equivalence = equivalence(registered_ckpt, rebuilt, tree / "data/processed/task")
    else:
        report.checks.append(Check("weights", *digests))
        if not report.checks[-1].ok:
            report.notes.append(_weights_diff(registered_ckpt, rebuilt))


def other_environments(
    tags: dict[str, str], rebuilt_env: dict[str, str], same_bytes: bool
) -> tuple[str, str] | None:
    """The registered and the rebuilt environment in words, when the weights are to be
    compared within tolerance: the environments differ and so do the bytes (another CPU
    generation with pinned kernels may give the same bytes: then the bytes are the verdict).
    None when the version records no environment. A version registered before the CPU model
    was recorded is not compared on it."""
    registered = {k: tags.get(f"graftline.env.{k}", "") for k in ENV_KEYS}
    registered["cpu"] = registered["cpu"] or rebuilt_env["cpu"]
    if same_bytes or not all(registered.values()) or registered == rebuilt_env:
        return None
    return _env_text(registered), _env_text(rebuilt_env)


def _environment(path: Path) -> dict[str, str]:
    try:
        env = json.loads(path.read_text())
    except (OSError, ValueError):
        return {k: "unknown" for k in ENV_KEYS}
    return {k: str(env.get(k, "unknown")) for k in ENV_KEYS}


def _env_text(env: dict[str, str]) -> str:
    """``avx2, torch 2.13.0+cpu, cpu, AMD EPYC``."""
    where = f"{env['cpu_capability'].lower()}, torch {env['torch']}, {env['device']}"
    return f"{where}, {env['cpu']}"


def equivalence(registered: Path, rebuilt: Path, task_data: Path) -> list[Check]:
    """Two models trained under other kernels: each tensor within ``RELATIVE_TOLERANCE`` of
    its norm, and the test accuracies on the same items within their 95 % interval (the
    paired difference's, from the items the two classify differently)."""
    import numpy as np
    import torch

    from graftline.data.store import load_split
    from graftline.models.checkpoint import load_checkpoint
    from graftline.train import predict_proba

    a = torch.load(registered, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(rebuilt, map_location="cpu", weights_only=True)["state_dict"]
    if a.keys() != b.keys():
        return [Check("architecture", "same", f"differs: {sorted(a.keys() ^ b.keys())[:5]}")]
    rel = {
        k: float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-12))
        for k in a
        if a[k].is_floating_point()
    }
    worst = max(rel, key=lambda k: rel[k])
    weights = Check(
        "weights",
        "",
        f"largest relative difference {rel[worst]:.2g} ({worst}), tolerance {RELATIVE_TOLERANCE}",
        rel[worst] <= RELATIVE_TOLERANCE,
    )
    test = load_split(task_data, "test")
    right = [
        predict_proba(load_checkpoint(path)[0], test.images).argmax(1) == test.labels
        for path in (registered, rebuilt)
    ]
    n = len(test.labels)
    acc = [float(r.mean()) for r in right]
    discordant = int(np.sum(right[0] != right[1]))
    half_width = 1.96 * np.sqrt(discordant) / n
    detail = (
        f"registered {acc[0]:.4f}, rebuilt {acc[1]:.4f} on {n} items "
        f"(95 % interval of the difference ±{half_width:.4f})"
    )
    return [weights, Check("test accuracy", "", detail, abs(acc[0] - acc[1]) <= half_width)]


def _weights_diff(registered: Path, rebuilt: Path) -> str:
    """Which tensors differ, and by how much."""
    import torch

    a = torch.load(registered, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(rebuilt, map_location="cpu", weights_only=True)["state_dict"]
    if a.keys() != b.keys():
        return f"the architectures differ: {sorted(a.keys() ^ b.keys())[:5]}"
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not a[k].equal(b[k])}
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    return f"{len(diffs)} of {len(a)} tensors differ; largest: " + ", ".join(
        f"{k} (max |diff| {v:.3g})" for k, v in worst
    )
