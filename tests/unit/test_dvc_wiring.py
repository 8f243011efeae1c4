"""dvc.yaml must match what each stage really imports, reads and writes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from graftline import layout as paths
from tests.conftest import ROOT

STAGES = list(paths.STAGES)

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_project_files(stage: str) -> set[str]:
    code = (
        f"import sys, tasks.{stage}, os\n"
        "root = os.getcwd()\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None) or ''\n"
        "    if f.startswith(root + os.sep) and '.venv' not in f:\n"
        "        print(os.path.relpath(f, root))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def dep_paths(stage: str) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in DVC[stage]["deps"]]


def out_paths(stage: str, kind: str = "outs") -> set[str]:
    return {o if isinstance(o, str) else next(iter(o)) for o in DVC[stage].get(kind, [])}


def test_stage_order_and_commands() -> None:
    assert list(DVC) == STAGES
    for s in STAGES:
        assert DVC[s]["cmd"] == f"python -m tasks.{s}"


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_imported_files(stage: str) -> None:
    files = imported_project_files(stage)
    code_deps = [d for d in dep_paths(stage) if d.startswith(("graftline", "tasks"))]
    for f in files:
        assert any(f == d or f.startswith(d + "/") for d in code_deps), f"{stage}: {f} not a dep"
    for d in code_deps:
        covered = {f for f in files if f == d or f.startswith(d + "/")}
        on_disk = (
            {str(p.relative_to(ROOT)) for p in (ROOT / d).rglob("*.py")}
            if (ROOT / d).is_dir()
            else {d}
        )
        assert covered == on_disk, f"{stage}: dep {d} includes files the stage does not use"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_reads_only_its_params_section(stage: str) -> None:
    assert DVC[stage]["params"] == [stage]


def test_data_deps_are_produced_upstream() -> None:
    produced: set[str] = set()
    for s in STAGES:
        for d in dep_paths(s):
            if d.startswith(("data/processed", "models", "reports")):
                assert d in produced, f"{s} depends on {d}, which no earlier stage writes"
        produced |= out_paths(s) | out_paths(s, "metrics") | out_paths(s, "plots")


def test_outs_match_the_paths_the_code_writes() -> None:
    assert out_paths("preprocess") == {str(paths.PRETRAIN_DATA), str(paths.TASK_DATA)}
    assert out_paths("pretrain") == {str(paths.PRETRAINED)}
    assert out_paths("finetune") == {str(paths.FINETUNED), str(paths.SCRATCH)}
    assert out_paths("pretrain", "metrics") == {str(paths.PRETRAIN_REPORT / "metrics.json")}
    assert out_paths("finetune", "metrics") == {str(paths.FINETUNE_REPORT / "metrics.json")}
    assert out_paths("evaluate", "metrics") == {str(paths.METRICS)}
    assert str(paths.RAW) in dep_paths("preprocess")
    evaluate_outs = out_paths("evaluate") | out_paths("evaluate", "plots")
    assert all(Path(o).parent == paths.EVALUATE_REPORT for o in evaluate_outs)


def test_lineage_tags_read_outs_the_stages_declare() -> None:
    """graftline.tracking names dvc.lock outs for lineage; they must be real stage outs."""
    from graftline.tracking import LINEAGE_OUTS

    for tag, (stage, path) in LINEAGE_OUTS.items():
        assert path in out_paths(stage), f"{tag}: {stage} does not write {path}"


def test_committed_lock_matches_code_and_params(tmp_path: Path) -> None:
    """The committed dvc.lock must record the committed code and params: a stale lock makes
    the first run of every fresh clone rewrite it, and its first model's lineage `-dirty`.

    Checked in a checkout of git's HEAD, not in this working tree: a user's own partial runs
    (`dvc repro pretrain` alone, other CPU kernels) rewrite the working tree's lock and
    reports, and are not a stale commit. (Outputs are not checked: a clean clone has none
    until `dvc pull` or a run.)"""
    from dvc.repo import Repo

    head = tmp_path / "head"
    git = ["git", "-C", str(ROOT)]
    if subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout with a commit")
    subprocess.run(
        [*git, "worktree", "add", "--detach", str(head), "HEAD"], check=True, capture_output=True
    )
    try:
        produced = set().union(*(out_paths(s) for s in STAGES))
        with Repo(str(head)) as repo:
            status = repo.status()
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(head)], capture_output=True)
    stale = [
        f"{stage.rsplit(':', 1)[-1]}: {path} {state}"
        for stage, changes in status.items()
        for change in changes
        if isinstance(change, dict)
        for path, state in change.get("changed deps", {}).items()
        if path not in produced
    ]
    assert not stale, (
        "the committed dvc.lock is stale against the committed code and params; run "
        "`make repro` and commit dvc.lock:\n" + "\n".join(stale)
    )


@pytest.mark.parametrize("preset", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_is_valid_and_has_every_tracked_section(preset: Path) -> None:
    """`graftline run --params PRESET` refuses a preset whose params are invalid or lack a
    section a stage tracks; none of the shipped ones may."""
    from graftline.config import load_params, require_tracked_sections

    load_params(preset)
    require_tracked_sections(preset, ROOT / "dvc.yaml")
