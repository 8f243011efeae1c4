"""The MLflow UI's model registry in headless Chromium, against a real `mlflow server`: the
version page shows graftline's model card and the `champion` alias; the registered model's
page says which version is live."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftline import layout as paths
from graftline import tracking
from graftline.data.store import save_splits
from graftline.registry import Registry
from tests.conftest import mlflow_server
from tests.integration.conftest import blobs, deploy_once, write_model

pytestmark = pytest.mark.e2e


def test_version_page_shows_the_model_card_and_the_champion_alias(
    tmp_path: Path, trained: torch.nn.Module, browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with mlflow_server(tmp_path) as (url, _proc):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv(tracking.EXPERIMENT_ENV, "registry-page")
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        root = tmp_path / "work"
        save_splits(root / paths.TASK_DATA, {"test": blobs(40, 7)}, {})
        tracking.configure(root)
        write_model(root, trained, dead_classes=[2])
        v1 = deploy_once(root)["version"]
        write_model(root, trained, dead_classes=[])
        v2 = deploy_once(root)["version"]
        reg = Registry("blobs")
        assert reg.champion_version() == v2
        # The new champion does not keep the challenger alias.
        assert reg.version(v2).aliases == ["champion"]
        card = reg.version(v2).description
        for part in ("**Model.**", "**Data.**", "**Test figures**", "**Gate.**", "**Reproduce.**"):
            assert part in card, card
        assert f"champion v{v1}" in card and f"graftline reproduce {v2}" in card
        assert "promoted to champion" in card
        assert f"Champion: v{v2}**" in reg.client.get_registered_model("blobs").description

        wait = WebDriverWait(browser, 60)
        browser.get(f"{url}/#/models/blobs/versions/{v2}")
        wait.until(lambda d: "Test figures" in d.find_element(By.TAG_NAME, "body").text)
        text = browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(tmp_path / "version-page.png"))
        assert "champion" in text and "promoted to champion" in text
        assert f"graftline reproduce {v2}" in text

        browser.get(f"{url}/#/models/blobs")
        wait.until(lambda d: f"Champion: v{v2}" in d.find_element(By.TAG_NAME, "body").text)
        browser.save_screenshot(str(tmp_path / "model-page.png"))
