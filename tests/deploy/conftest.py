"""Fixtures for the chart tests: renders of the value sets the chart must support."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .chart import SCENARIOS, Rendered, render


@pytest.fixture
def render_chart() -> Callable[[dict[str, Any] | None], Rendered]:
    return render


@pytest.fixture(params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[str, Rendered]:
    name: str = request.param
    return name, render(SCENARIOS[name])
