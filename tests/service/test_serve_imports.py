"""The service imports only the read side of `indexer` (DESIGN.md), and the client needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

ALLOWED = {"indexer.bundle", "indexer.model", "indexer.images", "indexer.errors"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "indexer")
    return names


def test_service_sources_import_only_the_read_side() -> None:
    files = sorted((REPO / "service").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        used = {m for m in imported_modules(path) if m == "indexer" or m.startswith("indexer.")}
        assert used <= ALLOWED, f"{path.relative_to(REPO)} imports {sorted(used - ALLOWED)}"


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_service_import_graph_stays_on_the_read_side() -> None:
    loaded = _loaded_after("import service.app, service.server, service.client")
    indexer = {m for m in loaded if m.startswith("indexer.")}
    assert indexer <= ALLOWED, sorted(indexer - ALLOWED)
    assert "service.app" in loaded


def test_client_import_needs_no_torch() -> None:
    loaded = _loaded_after("import service.client")
    assert not {"torch", "faiss", "open_clip", "fastapi"} & loaded
