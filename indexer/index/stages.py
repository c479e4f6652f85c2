"""Named moments of an indexing run, and the test hook that can stop a run at one of them.

The crash tests and `benchmarks/faults.py` set `CLIPSEARCH_TEST_PAUSE_AT=<stage>` (or `<stage>#N`, the
N-th time the run reaches it); the run leaves `paused-<stage>` in `.work/` (or in
`CLIPSEARCH_TEST_PAUSE_DIR`) and sleeps there, so the test can `kill -9` it at exactly that point. With
`CLIPSEARCH_TEST_PAUSE_RESUME=1` it carries on once the test deletes the marker (to fill the disk
meanwhile, say). Unset, `reached` costs one lookup.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

PAUSE_ENV = "CLIPSEARCH_TEST_PAUSE_AT"
PAUSE_DIR_ENV = "CLIPSEARCH_TEST_PAUSE_DIR"
RESUME_ENV = "CLIPSEARCH_TEST_PAUSE_RESUME"
STAGES = (
    "scan-hashed",  # each file hashed (reached once per file)
    "scanned",
    "cache-write",  # inside each cache batch's transaction, before it commits
    "embedded-batch-1",
    "embedded-batch",  # after each batch is committed
    "embedded",
    "built-images",  # the image index is built, the text index not yet
    "publish-model",  # the model files are in the temp dir
    "publish-indexes",  # the FAISS files are written
    "publish-written",  # the temp dir is complete and verified
    "publish-renamed",  # renamed into place, CURRENT not yet replaced
    "current-tmp",  # CURRENT.tmp written and fsynced, not yet renamed over CURRENT
    "published",
)
_seen: Counter[str] = Counter()


def reached(stage: str, work_dir: Path | None = None) -> None:
    """The run is at `stage`; pause here (after leaving a marker file) when the hook asks for it."""
    want = os.environ.get(PAUSE_ENV)
    if not want:
        return
    name, _, nth = want.partition("#")
    if name != stage:
        return
    _seen[stage] += 1
    if _seen[stage] != int(nth or 1):
        return
    folder = Path(os.environ.get(PAUSE_DIR_ENV) or work_dir or ".")
    marker = folder / f"paused-{stage}"
    marker.touch()
    resume = os.environ.get(RESUME_ENV) == "1"
    while not resume or marker.exists():
        time.sleep(0.05 if resume else 60)
