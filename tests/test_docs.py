"""The docs stay true: every command-line flag, every service setting and every HTTP route is documented."""

from __future__ import annotations

import re

import typer.main

from clipsearch.cli import app
from service.app import create_app
from service.settings import ServiceSettings
from tests.conftest import REPO

DOCS = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])


def _commands(group, path=()):  # type: ignore[no-untyped-def]
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_every_command_and_flag_is_documented() -> None:
    root = typer.main.get_command(app)
    missing = []
    for path, cmd in _commands(root):
        if f"clipsearch {' '.join(path)}" not in DOCS:
            missing.append(" ".join(path))
        for param in cmd.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("--") and opt != "--help" and not re.search(rf"{re.escape(opt)}\b", DOCS):
                    missing.append(f"{' '.join(path)} {opt}")
    assert not missing, f"not in README.md or docs/: {missing}"


def test_every_setting_is_documented() -> None:
    missing = [n for n in ServiceSettings.model_fields if f"CLIPSEARCH_{n.upper()}" not in DOCS]
    assert not missing


def test_every_route_is_documented() -> None:
    paths = {getattr(r, "path", "") for r in create_app(ServiceSettings()).routes}
    documented = {p for p in paths if p.replace("{item_id}", "42") in DOCS or p in DOCS}
    assert paths - documented <= {"/openapi.json", "/docs/oauth2-redirect", "/redoc", "/static"}, sorted(
        paths - documented
    )
