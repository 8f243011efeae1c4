"""`graftline reproduce VERSION`: a registered version rebuilt from its lineage tags alone, in a
fresh worktree of a real git repo, with DVC and a real MLflow store."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import TINY_PARAMS, graftline, make_repo, sh, tool_env

NAME = "tiny-digits"
# The kernels as each machine has them (train.portable off): v1 is registered under this
# machine's native level, so that a rebuild under other kernels can differ in its last bits.
PARAMS = copy.deepcopy(TINY_PARAMS)
for _stage in ("pretrain", "finetune"):
    PARAMS[_stage]["train"]["portable"] = False


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str) -> Path:
    """A repo whose pipeline ran once through the flow and registered v1."""
    remote = tmp_path_factory.mktemp("remote")
    repo = make_repo(tmp_path_factory.mktemp("repo"), PARAMS, remote)
    home = tmp_path_factory.mktemp("home")
    proc = reproduce_cli(repo, "run", "--push", home=home, PREFECT_API_URL=prefect_api_url)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return repo


def reproduce_cli(
    repo: Path, *args: str, home: Path | None = None, **extra: str
) -> subprocess.CompletedProcess:
    env = tool_env(repo, **({"PREFECT_HOME": str(home)} if home else {}))
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    return graftline(repo, {**env, **extra}, *args)


@pytest.fixture
def client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


@pytest.fixture
def tag(client: MlflowClient) -> Iterator[Callable[[str, str], None]]:
    """Change a tag of v1 for one test; put it back afterwards."""
    saved = dict(client.get_model_version(NAME, "1").tags)

    def change(key: str, value: str) -> None:
        client.set_model_version_tag(NAME, "1", key, value)

    yield change
    for key, value in saved.items():
        client.set_model_version_tag(NAME, "1", key, value)


def test_a_version_rebuilds_bit_identical(repo: Path, client: MlflowClient) -> None:
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    proc = reproduce_cli(repo, "reproduce", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{NAME} v1: bit-identical" in proc.stdout
    for what in ("task data", "pretrained backbone", "params", "weights"):
        assert any(
            line.strip().startswith(what) and " same " in line for line in proc.stdout.splitlines()
        ), what
    # Nothing left in the checkout: no worktree, no runs in its tracking store.
    assert len(sh(["git", "worktree", "list"], repo).stdout.splitlines()) == 1
    runs_after = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    assert runs_after == runs_before


def test_a_commit_that_is_gone_is_named(repo: Path, tag: Callable[[str, str], None]) -> None:
    tag("graftline.git_commit", "f" * 40)
    proc = reproduce_cli(repo, "reproduce", "1")
    assert proc.returncode == 2
    assert f"commit {'f' * 40}, which this repository does not have" in proc.stderr


def test_data_missing_from_cache_and_remote_is_named(
    repo: Path, tag: Callable[[str, str], None]
) -> None:
    # A commit whose DVC-tracked input exists nowhere: neither in the cache nor the remote.
    (repo / "data/raw/extra.txt.dvc").write_text(
        "outs:\n- md5: 00000000000000000000000000000000\n  size: 3\n  hash: md5\n"
        "  path: extra.txt\n"
    )
    sh(["git", "add", "data/raw/extra.txt.dvc"], repo)
    sh(["git", "commit", "-qm", "data that was never pushed"], repo)
    commit = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    sh(["git", "rm", "-q", "data/raw/extra.txt.dvc"], repo)
    sh(["git", "commit", "-qm", "and gone again"], repo)
    tag("graftline.git_commit", commit)
    proc = reproduce_cli(repo, "reproduce", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is in neither the DVC cache nor the remote (data/raw/extra.txt.dvc)" in proc.stderr


def test_an_unknown_version_is_a_clear_error(repo: Path) -> None:
    proc = reproduce_cli(repo, "reproduce", "42")
    assert proc.returncode == 2
    assert f"model '{NAME}' has no version 42" in proc.stderr


def test_rebuilt_under_other_kernels_is_equivalent_and_names_both(
    repo: Path, tag: Callable[[str, str], None]
) -> None:
    """Registered under the native kernels; rebuilt with ATEN_CPU_CAPABILITY=default (no
    SIMD), as another machine's CPU would: the bits cannot be promised, so the weights and
    the test accuracy are compared within tolerance, and the report says where each was
    built. One rebuild shows a difference too: the task data's registered hash is changed,
    so the verdict is `different` (exit 1) and names it, while the weights stay within
    tolerance. (`equivalent`, exit 3, when nothing differs: tests/unit/test_reproduce_env.py.)
    """
    import torch

    native = torch.backends.cpu.get_cpu_capability().lower()
    tag("graftline.dvc.task_data", "0123456789abcdef0123456789abcdef.dir")
    env = tool_env(repo, ATEN_CPU_CAPABILITY="default")
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    proc = graftline(repo, env, "reproduce", "1")
    print(proc.stdout)  # the report, for `pytest -s`: how far the rebuilt weights moved
    assert proc.returncode == 1, proc.stdout + proc.stderr
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict.startswith(f"{NAME} v1: different (registered on {native}, ")
    assert "rebuilt on default" in verdict
    lines = [line.strip() for line in proc.stdout.splitlines()]
    for what in ("weights", "test accuracy"):
        assert any(x.startswith(what) and " within " in x for x in lines), what
    data = next(x for x in lines if x.startswith("task data"))
    assert "DIFFERS" in data and "registered 0123456789abcdef" in data
    assert any(x.startswith("params") and " same " in x for x in lines)
