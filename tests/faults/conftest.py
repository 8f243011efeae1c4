"""The fault suite: each test makes one fault real (a killed process, an unreachable server, a
bad file) and checks that nothing was lost. Every test here carries the `faults` marker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="module")
def fault_prefect_api(prefect_api_url: str) -> Iterator[None]:
    """The session's Prefect server for a module's `graftline run`s (tests.faults._pipeline)."""
    from tests.faults import _pipeline

    _pipeline.PREFECT_API["url"] = prefect_api_url
    yield
    _pipeline.PREFECT_API.clear()
