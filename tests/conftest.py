"""Shared test configuration: e2e tests are marked and fail (never skip) without QEMU/image."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)
pytest_plugins = ["pytester"]
