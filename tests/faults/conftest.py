"""The fault suite: each test makes one fault real (a killed process, an unreachable server, a
bad file) and checks that nothing was lost. Every test here carries the `faults` marker."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.faults)
