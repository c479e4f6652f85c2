"""Static checks of docker-compose.yml and its GPU override, and of the commands the containers run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.conftest import run_cli
from tests.ship.dockerfiles import parse

REPO = Path(__file__).resolve().parents[2]


def _load(name: str) -> dict[str, Any]:
    path = REPO / name
    assert path.is_file(), f"{name} is missing"
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), f"{name} has no services"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load("docker-compose.yml")


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short-syntax volume of a service."""
    out = []
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out.append((source, target, "ro" in (mode[0].split(",") if mode else [])))
    return out


def _duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a compose duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_services_and_named_volume(compose):
    assert {"indexer", "api"} <= set(compose["services"])
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, _, _ in _mounts(service):
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts volume {source!r}, not declared at the top level"
    assert _mounts(compose["services"]["indexer"])[0][0] in declared, "the indexer must write a named volume"


def test_indexer_is_a_one_shot_demo_into_the_volume(compose):
    indexer = compose["services"]["indexer"]
    command = indexer["command"]
    assert command[0] == "demo" and "--no-serve" in command
    workdir = command[command.index("--workdir") + 1]
    assert any(target == workdir and not ro for _, target, ro in _mounts(indexer)), (
        "workdir is not the volume"
    )
    assert indexer.get("restart", "no") == "no", "a one-shot job must not be restarted"


def test_api_waits_for_the_indexer_and_reads_its_bundles_read_only(compose):
    api, indexer = compose["services"]["api"], compose["services"]["indexer"]
    assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    command = api["command"]
    assert command[0] == "serve"
    bundles = PurePosixPath(command[command.index("--bundles") + 1])
    indexer_volumes = {source for source, _, _ in _mounts(indexer)}
    mounts = [(s, PurePosixPath(t), ro) for s, t, ro in _mounts(api) if s in indexer_volumes]
    assert mounts, "the api does not mount the indexer's volume"
    assert all(ro for _, _, ro in mounts), "the api must mount the bundles read-only"
    assert any(bundles.is_relative_to(target) for _, target, _ in mounts), f"{bundles} is outside the mount"
    assert command[command.index("--host") + 1] == "0.0.0.0", (
        "inside a container serve must listen on all interfaces"
    )


def test_api_publishes_its_port_and_stops_and_restarts_sanely(compose):
    api = compose["services"]["api"]
    port = api["command"][api["command"].index("--port") + 1]
    assert any(str(p).rsplit(":", 1)[-1] == port for p in api["ports"]), (
        f"container port {port} not published"
    )
    assert api["restart"] in ("always", "unless-stopped", "on-failure")
    assert 5 <= _duration_s(api["stop_grace_period"]) <= 120


def test_api_healthcheck_probes_readyz_with_python(compose):
    check = compose["services"]["api"]["healthcheck"]
    assert check["test"][0] == "CMD" and check["test"][1] == "python"
    assert "/readyz" in " ".join(check["test"])
    for key in ("interval", "timeout", "start_period"):
        _duration_s(check[key])


@pytest.mark.slow
def test_api_healthcheck_passes_only_when_ready(compose, readyz_stub):
    argv = [sys.executable, *compose["services"]["api"]["healthcheck"]["test"][2:]]
    argv = [a.replace(":8000/", f":{readyz_stub.port}/") for a in argv]
    readyz_stub.status = 200
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    readyz_stub.status = 503
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode != 0


def test_gpu_override_reserves_an_nvidia_gpu(compose):
    gpu = _load("docker-compose.gpu.yml")
    assert set(gpu["services"]) <= set(compose["services"]), "the override names unknown services"
    for name in ("indexer", "api"):
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        variant = gpu["services"][name]["build"]["args"]["TORCH_VARIANT"]
        torch_runs = " ".join(r.args for s in parse(REPO / "Dockerfile")[1] for r in s.all("RUN"))
        assert f"{variant})" in torch_runs, f"the Dockerfile has no TORCH_VARIANT={variant} branch"


def _container_commands() -> list[list[str]]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    commands = [s["command"] for s in compose["services"].values() if "command" in s]
    cmd = parse(REPO / "Dockerfile")[1][-1].all("CMD")[-1].exec_form()
    unique = {tuple(c): list(c) for c in [*commands, *([cmd] if cmd else [])]}
    return list(unique.values())


@pytest.mark.parametrize("argv", _container_commands(), ids=lambda a: " ".join(a))
@pytest.mark.slow
def test_container_commands_exist_with_their_flags(argv):
    """`clipsearch SUB --help` works and lists every flag the containers pass (run as a real process)."""
    result = run_cli([argv[0], "--help"], env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}, timeout=120)
    assert result.returncode == 0, f"clipsearch {argv[0]} --help failed:\n{result.stdout}{result.stderr}"
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in result.stdout, f"clipsearch {argv[0]} has no {flag} flag"
