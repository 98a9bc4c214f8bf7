"""Fixtures for the chart tests: the helm and promtool binaries, and rendering the chart."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from chart_helpers import Render, find_helm, find_promtool, helm_template


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary (see chart_helpers.find_helm)."""
    return find_helm()


@pytest.fixture(scope="session")
def promtool() -> Path:
    """The promtool binary (see chart_helpers.find_promtool)."""
    return find_promtool()


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """Render the chart to a list of manifests (memoized per argument list)."""
    cache: dict[tuple[str, ...], list[dict]] = {}

    def _render(*args: str) -> list[dict]:
        if args not in cache:
            cache[args] = [doc for doc in yaml.safe_load_all(helm_template(helm, *args)) if doc]
        return cache[args]

    return _render
