"""docker-compose.yml read the way Docker Compose reads it: variables interpolated, volumes parsed.

Shared by the static checks (`test_compose.py`) and `make docker-test` (`compose_run.py`), which
follows the file with `podman run` where no Docker engine exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

# $$ | ${NAME} | ${NAME:-default} | ${NAME-default} | $NAME  (the subset of the Compose spec we use)
_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?-)([^}]*))?\}|(\w+))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution on one string; `${NAME:-x}` also replaces an empty NAME."""

    def sub(m: re.Match[str]) -> str:
        escaped, name, op, default, bare = m.groups()
        if escaped:
            return "$"
        name = name or bare
        value = env.get(name)
        if op == ":-" and not value:
            return default
        if op == "-" and value is None:
            return default
        return value or ""

    if re.search(r"\$\{\w+:?[?+]", text):
        raise ValueError(f"unsupported interpolation in {text!r}")
    return _VARIABLE.sub(sub, text)


def _walk(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [_walk(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, env) for k, v in value.items()}
    return value


def load(name: str = "docker-compose.yml", env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file with its variables filled from `env` (default: none set, so every default)."""
    path = REPO / name
    assert path.is_file(), f"{name} is missing"
    data = _walk(yaml.safe_load(path.read_text()), env or {})
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), f"{name} has no services"
    return data


@dataclass(frozen=True)
class Mount:
    source: str  # a volume name, or a host path
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        """Compose's rule: a source that looks like a path is a bind mount, anything else a volume."""
        return self.source.startswith((".", "/", "~"))


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    """Short-syntax volumes of a service (after interpolation)."""
    out = []
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out.append(Mount(source, target, "ro" in (mode[0].split(",") if mode else [])))
    return out


def duration_s(text: str) -> float:
    """A compose duration (`1m30s`, `15s`, `500ms`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a compose duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)
