"""The web page in headless Chromium against `graftline serve` on loopback: draw a digit
with the mouse, upload an image, read the answer; the page follows a promotion."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graftline.registry import Registry
from tests.conftest import ROOT, free_port
from tests.integration.conftest import blobs, deploy_once, write_model

pytestmark = pytest.mark.e2e


def test_draw_upload_and_follow_promotion(
    sqlite_root: Path, trained: torch.nn.Module, browser, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    write_model(sqlite_root, trained, dead_classes=[2])
    v1 = deploy_once(sqlite_root)["version"]
    with serving(sqlite_root, "blobs", tmp_path) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 20)
        pad = browser.find_element(By.ID, "pad")
        # A horizontal bar across the middle: the blob set's class "0".
        ActionChains(browser).move_to_element_with_offset(
            pad, -95, 0
        ).click_and_hold().move_by_offset(60, 0).move_by_offset(60, 0).move_by_offset(
            70, 0
        ).release().perform()
        browser.find_element(By.ID, "predict").click()
        wait.until(lambda d: d.find_element(By.ID, "answer").text != "")
        assert browser.find_element(By.ID, "answer").text == "0"
        assert browser.find_element(By.ID, "version").text == f"blobs v{v1}"
        bars = browser.find_elements(By.CSS_SELECTOR, "#top3 .bar")
        assert len(bars) == 3
        browser.save_screenshot(str(tmp_path / "drawn.png"))

        # upload a digit image (class "1", larger and grey-on-white as a scan would be)
        test = blobs(1, 41)
        img = 255 - np.kron(test.images[1, 0], np.ones((4, 4), dtype=np.uint8))
        Image.fromarray(img).convert("RGB").save(tmp_path / "upload.jpg")
        browser.find_element(By.ID, "upload").send_keys(str(tmp_path / "upload.jpg"))
        wait.until(lambda d: d.find_element(By.ID, "answer").text == "1")

        # promote a new champion: the running service follows it by itself
        write_model(sqlite_root, trained, dead_classes=[])
        v2 = deploy_once(sqlite_root)["version"]
        assert Registry("blobs").champion_version() == v2
        deadline = time.time() + 20
        while time.time() < deadline:
            browser.find_element(By.ID, "predict").click()
            time.sleep(0.5)
            if browser.find_element(By.ID, "version").text == f"blobs v{v2}":
                break
        assert browser.find_element(By.ID, "version").text == f"blobs v{v2}"


@contextlib.contextmanager
def serving(root: Path, name: str, tmp_path: Path) -> Iterator[str]:
    """`graftline serve` for model ``name`` in ``root`` on a free loopback port, until it is
    ready; yields its URL."""
    (root / "params.yaml").write_text(json.dumps({"deploy": {"model_name": name}}))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRAFTLINE_API_TOKEN", None)
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "graftline.cli", "serve", "--port", str(port), "--poll", "0.5"],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if json.loads(urllib.request.urlopen(f"{url}/ready", timeout=2).read())["ready"]:
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (
                    tmp_path / "serve.log"
                ).read_text()
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def test_a_text_champion_gets_a_text_box(text_root: Path, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(text_root, "blob-texts", tmp_path) as url:
        text = "good great lovely good coffee 好"
        request = urllib.request.Request(
            f"{url}/predict",
            data=json.dumps({"texts": [text]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        expected = json.loads(urllib.request.urlopen(request, timeout=10).read())["predictions"][0]
        browser.get(url)
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "textpanel").is_displayed())
        assert not browser.find_element(By.ID, "pad").is_displayed()
        browser.find_element(By.ID, "text").send_keys(text)
        browser.find_element(By.ID, "predict-text").click()
        wait.until(lambda d: d.find_element(By.ID, "answer").text != "")
        assert browser.find_element(By.ID, "answer").text == expected["class"]
        assert browser.find_element(By.ID, "version").text == "blob-texts v1"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#top3 .bar")) == 3
        assert browser.find_element(By.ID, "truncated").text == ""
        box = browser.find_element(By.ID, "text")
        box.clear()
        box.send_keys("good " * 40)  # over the model's 16 tokens
        browser.find_element(By.ID, "predict-text").click()
        wait.until(lambda d: "cut" in d.find_element(By.ID, "truncated").text)
        browser.save_screenshot(str(tmp_path / "text.png"))
