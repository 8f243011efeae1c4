"""Same inputs, same bits on any machine of this kind: with `train.portable` (the default)
every training stage pins its CPU kernels, so a rebuild under other kernel levels gives the
committed lock's hashes; without it, the last bits follow the machine's kernels."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY_PARAMS, make_repo, sh

pytestmark = pytest.mark.e2e

STAGES = ("pretrain",)
OUTS = ("models/pretrained",)


def _hashes(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in STAGES for o in lock[s]["outs"] if o["path"] in OUTS}


def _levels() -> list[str]:
    """The kernel levels this machine can run: default, and avx2 / avx512 where it has them."""
    native = torch.backends.cpu.get_cpu_capability().lower()
    return ["default", "avx2", *(["avx512"] if native == "avx512" else [])]


@pytest.mark.parametrize("portable", [True, False], ids=["portable", "native"])
def test_kernel_levels_and_the_portable_setting(tmp_path: Path, portable: bool) -> None:
    params = copy.deepcopy(TINY_PARAMS)
    for stage in STAGES:
        params[stage]["train"]["portable"] = portable
    repo = make_repo(tmp_path / "repo", params)
    sh(["dvc", "repro", "pretrain"], repo)
    native = _hashes(repo)
    env = yaml.safe_load(
        (repo / ".graftline/environment/pretrained.json").read_text()
    )  # what the run recorded
    assert env["portable"] == str(portable).lower()
    got = {}
    # The levels other than the pinned one (avx2); without the setting, one other level
    # shows the difference (the scalar kernels).
    others = [level for level in _levels() if level != "avx2"] if portable else ["default"]
    for level in others:
        shutil.rmtree(repo / "models")
        # Only pretrain: preprocess's outputs are in place and hold no trained weights.
        sh(
            ["dvc", "repro", "--force", "--single-item", "pretrain"],
            repo,
            ATEN_CPU_CAPABILITY=level,
        )
        got[level] = _hashes(repo)
    if portable:  # every level gives the native run's bits
        assert all(h == native for h in got.values()), got
    else:  # the scalar kernels compute other last bits: the reason the setting exists
        assert got["default"] != native, got
