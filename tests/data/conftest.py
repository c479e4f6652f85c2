"""Fixtures for the data-set builders: one small emoji build shared by the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# 30 concepts in the fixed pseudo-random order give 38 images, among them the 6 skin tones of 👌 and
# the man/woman/person variants of two family emoji: enough to show variants never straddle the split.
EMOJI_ARGS = ["--limit", "30", "--val-fraction", "0.3", "--size", "48", "--workers", "1"]


def build_emoji(out: Path, *extra: str) -> None:
    result = run_cli(["data", "emoji", "--out", str(out), *EMOJI_ARGS, *extra])
    assert result.returncode == 0, result.stderr
    assert "emoji images" in result.stdout


@pytest.fixture(scope="session")
def emoji_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only small emoji data set; tests that modify one build their own."""
    if not EMOJI_FONT.is_file():
        pytest.fail(f"{EMOJI_FONT} is missing: apt-get install fonts-noto-color-emoji (the CI does)")
    out = tmp_path_factory.mktemp("emoji") / "data"
    build_emoji(out)
    return out
