"""A short Schemathesis pass over the whole API (the long one is `benchmarks/faults.py --only fuzz`):
every generated request, valid or not, gets an answer the OpenAPI schema documents, never a 5xx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_generated_requests_get_documented_answers_and_no_server_errors(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "faults.py"), "--only", "fuzz", "--fuzz-examples", "12"]
    proc = subprocess.run(
        [*cmd, "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=850,
    )
    (row,) = json.loads(out.read_text())["rows"]
    details = row["details"]
    assert details["requests"] >= 100, details["statuses"]
    assert details["server_errors"] == 0
    assert details["failures"] == {}, json.dumps(details["failures"], indent=1)[:4000]
    assert proc.returncode == 0 and row["passed"] == 1, proc.stdout[-2000:]
    served = {key.rsplit(" ", 1)[0] for key in details["statuses"]}
    assert {"POST /v1/search/text", "POST /v1/search/image", "GET /v1/items/{item_id}/image"} <= served
