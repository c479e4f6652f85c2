"""Fixtures for the indexer's tests (helpers live in `tests/index/helpers.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.index.helpers import make_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "photos", 6)
