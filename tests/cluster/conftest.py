"""Fixtures the process tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Launcher


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Starts node processes for one test and ends every one of them after it."""
    la = Launcher(tmp_path)
    try:
        yield la
    finally:
        la.cleanup()
