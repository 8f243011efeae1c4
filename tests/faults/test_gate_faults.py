"""Case 11: a model that must not reach production does not: a first model below the minimum,
and a challenger worse than the champion, are registered but not promoted, the champion and
its alias do not move, and the reason is recorded on the version."""

from __future__ import annotations

from pathlib import Path

import torch

from graftline.registry import Registry
from tests.integration.conftest import (  # noqa: F401 - fixtures shared with integration
    deploy_once,
    sqlite_root,
    trained,
    write_model,
)


def test_weak_models_are_registered_but_never_promoted(
    sqlite_root: Path, trained: torch.nn.Module
) -> None:
    reg = Registry("blobs")
    write_model(sqlite_root, trained, dead_classes=[1, 2])  # one class of three: 1/3 right
    low = deploy_once(sqlite_root)
    assert not low["promoted"] and reg.champion_version() is None
    tags = reg.version(low["version"]).tags
    assert tags["graftline.gate.passed"] == "false"
    assert "below the minimum" in tags["graftline.gate.reason"]

    write_model(sqlite_root, trained, dead_classes=[])
    good = deploy_once(sqlite_root)
    assert good["promoted"] and reg.champion_version() == good["version"]

    write_model(sqlite_root, trained, dead_classes=[0])  # worse than the champion
    worse = deploy_once(sqlite_root)
    assert not worse["promoted"]
    assert reg.champion_version() == good["version"]
    assert str(reg.client.get_registered_model("blobs").aliases["champion"]) == good["version"]
    reason = reg.version(worse["version"]).tags["graftline.gate.reason"]
    assert "no better than the champion" in reason
    assert [e["version"] for e in reg.history()] == [good["version"]]
