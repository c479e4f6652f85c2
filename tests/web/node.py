"""Runs the page's JavaScript modules in Node (no browser needed) for the tests of its pure logic."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
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
    with tempfile.TemporaryDirectory() as tmp:
        # The page's modules are plain `.js` files: Node before 22 reads those as CommonJS unless a
        # package.json says "module" (Debian bookworm has Node 18), so they run from a copy that has one.
        here = Path(tmp) / "static"
        shutil.copytree(module.parent, here)
        (here / "package.json").write_text('{"type": "module"}')
        url = json.dumps((here / module.name).as_uri())
        script = f"import * as m from {url};\n{setup}\nconsole.log(JSON.stringify({expr}));"
        out = subprocess.run(
            [node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=30
        )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
