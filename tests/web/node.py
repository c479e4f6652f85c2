"""Runs the page's JavaScript modules in Node (no browser needed) for the tests of its pure logic."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest


def run_module(module: Path, expr: str, setup: str = "") -> object:
    """Imports `module` as `m` in Node, runs the statements `setup`, and returns the value of the
    JavaScript expression `expr` through JSON.

    Node missing is a failure, not a skip: `make test` installs it (the Makefile's TEST_PACKAGES)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is missing: the page's logic tests need Node.js (apt-get install nodejs)", pytrace=False
        )
    script = (
        f"import * as m from {json.dumps(module.as_uri())};\n{setup}\nconsole.log(JSON.stringify({expr}));"
    )
    out = subprocess.run(
        [node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
