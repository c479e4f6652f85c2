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


def _error_table() -> set[str]:
    api = (REPO / "docs" / "api.md").read_text()
    table = api[api.index("| status | code | when |") :].split("\n\n")[0]
    return {code for row in table.splitlines() for code in re.findall(r"`(\w+)`", row.split("|")[2])}


def test_every_error_code_the_api_answers_is_in_the_error_table() -> None:
    from service.errors import _STATUS_CODES

    source = "\n".join(p.read_text() for p in sorted((REPO / "service").rglob("*.py")))
    codes = set(re.findall(r'ApiError\(\s*\d+,\s*"(\w+)"', source))
    codes |= set(re.findall(r'_raw_response\(\s*[\w.]+,\s*\d+,\s*"[^"]*",\s*"(\w+)"', source))
    codes |= set(_STATUS_CODES.values()) | {"internal_error"}
    images = (REPO / "indexer" / "core" / "images.py").read_text()
    upload = set(re.findall(r'(?:ImageError|TooManyPixels|UnsupportedFormat)\(\s*"(\w+)"', images))
    codes |= (upload | {"truncated", "corrupt"}) - {"not_found", "not_a_file"}  # uploads are never paths
    assert {"bad_request", "unreadable", "changed_on_disk", "request_timeout"} <= codes
    assert codes - _error_table() == set()


def test_every_route_is_documented() -> None:
    paths = {getattr(r, "path", "") for r in create_app(ServiceSettings()).routes}
    documented = {p for p in paths if p.replace("{item_id}", "42") in DOCS or p in DOCS}
    assert paths - documented <= {"/openapi.json", "/docs/oauth2-redirect", "/redoc", "/static"}, sorted(
        paths - documented
    )
