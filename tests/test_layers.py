"""The import rules of docs/architecture.md, read from the sources: each room imports only the rooms below it.

A room is a directory; a module belongs to the deepest room that holds it. The rules are data, here, once.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

CORE, DATA, TRAIN, EVAL, INDEX = (
    "indexer/core",
    "indexer/data",
    "indexer/train",
    "indexer/eval",
    "indexer/index",
)
ALLOWED: dict[str, set[str]] = {
    CORE: set(),
    DATA: {CORE},
    EVAL: {CORE, DATA},
    # Validating during training is evaluation: the loop reuses the one implementation of the metrics.
    TRAIN: {CORE, DATA, EVAL},
    INDEX: {CORE, DATA},
    "service": {CORE},
    "clipsearch": {CORE, DATA, TRAIN, EVAL, INDEX, "service"},
}
ROOMS = sorted(ALLOWED, key=len, reverse=True)  # deepest first, so indexer/core wins over indexer
PACKAGES = ("indexer", "service", "clipsearch")


def room_of_module(module: str) -> str | None:
    """The room a dotted module name lives in (`indexer.core.bundle.read` -> `indexer/core`)."""
    path = module.replace(".", "/")
    return next((r for r in ROOMS if path == r or path.startswith(r + "/")), None)


def imports_under(room: str) -> Iterator[tuple[str, str]]:
    """(file, imported module) for every import of our packages in the files of `room`."""
    for path in sorted((REPO / room).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative imports hide the room they reach"
                base = node.module or ""
                names = [f"{base}.{a.name}" for a in node.names] if base in PACKAGES else [base]
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    yield str(path.relative_to(REPO)), name


@pytest.mark.parametrize("room", list(ALLOWED))
def test_imports_follow_the_layers(room: str) -> None:
    found = list(imports_under(room))
    for module, target in found:
        owner = room_of_module(target)
        # A module directly in `indexer/` (there are none today) would belong to no room: refused too.
        assert owner in ALLOWED[room] | {room}, f"{module} imports {target} ({owner or 'no room'})"


def test_every_module_is_in_a_room() -> None:
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            module = ".".join(rel.parts).removesuffix(".__init__")
            if module == "indexer":
                continue  # the package's own docstring
            assert room_of_module(module) is not None, f"{rel} lies in no room of ALLOWED"


def test_nothing_imports_the_cli_package() -> None:
    for room in ALLOWED:
        if room != "clipsearch":
            targets = {t for _, t in imports_under(room)}
            assert not {t for t in targets if t.split(".")[0] == "clipsearch"}, room


def _loaded_after(code: str, **env: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=env.pop("cwd", str(REPO)),
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


@pytest.mark.slow
def test_service_import_graph_stays_on_the_read_side() -> None:
    loaded = _loaded_after("import service.app, service.server, service.client")
    ours = {m for m in loaded if m.split(".")[0] == "indexer" and m != "indexer"}
    assert ours and all(room_of_module(m) == CORE for m in ours), sorted(ours)
    assert "service.app" in loaded


@pytest.mark.slow
def test_client_import_needs_no_torch() -> None:
    loaded = _loaded_after("import service.client")
    assert not {"torch", "faiss", "open_clip", "fastapi"} & loaded


@pytest.mark.slow
def test_manifest_types_need_no_torch_or_open_clip() -> None:
    loaded = _loaded_after("import indexer.core.bundle.manifest, indexer.core.bundle.layout")
    assert not {"torch", "open_clip", "faiss"} & loaded


@pytest.mark.slow
def test_no_module_writes_files_at_import(tmp_path: Path) -> None:
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if p.name != "__main__.py"
    )
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    _loaded_after(f"import {', '.join(modules)}", TMPDIR=str(tmp), cwd=str(cwd))
    assert not list(tmp.iterdir()) and not list(cwd.iterdir())
