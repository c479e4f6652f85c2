"""Named moments of an indexing run, and the test hook that can stop a run at one of them.

The crash tests set `CLIPSEARCH_TEST_PAUSE_AT=<stage>`; the run leaves `.work/paused-<stage>` and sleeps
there, so the test can `kill -9` it at exactly that point. Unset, `reached` costs one lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "CLIPSEARCH_TEST_PAUSE_AT"
STAGES = (
    "scanned",
    "embedded-batch-1",
    "embedded",
    "publish-written",
    "publish-renamed",
    "published",
)


def reached(stage: str, work_dir: Path) -> None:
    """The run is at `stage`; pause here forever (after leaving a marker file) when the hook asks."""
    if os.environ.get(PAUSE_ENV) == stage:
        (work_dir / f"paused-{stage}").touch()
        while True:
            time.sleep(60)
