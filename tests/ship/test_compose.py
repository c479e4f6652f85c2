"""Static checks of docker-compose.yml and its GPU override, and of the commands the containers run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from tests.conftest import run_cli
from tests.ship.composefile import REPO, duration_s, interpolate, load, mounts
from tests.ship.dockerfiles import parse

PHOTOS = {"PHOTOS": "/home/me/Pictures"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load("docker-compose.yml")


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    return [(m.source, m.target, m.read_only) for m in mounts(service)]


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${UNSET:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET", env) == (
        "x d d  d x $SET"
    )
    with pytest.raises(ValueError, match="unsupported"):
        interpolate("${SET:?required}", env)


@pytest.mark.parametrize("env", [{}, PHOTOS], ids=["demo", "photos"])
def test_services_and_named_volume(env):
    compose = load("docker-compose.yml", env)
    assert {"indexer", "api"} <= set(compose["services"])
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for mount in mounts(service):
            if not mount.is_bind:
                assert mount.source in declared, f"{name} mounts volume {mount.source!r}, not declared"
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


def _photos_mount(compose: dict[str, Any], service: str) -> tuple[str, str, bool]:
    command = compose["services"]["indexer"]["command"]
    images = command[command.index("--images") + 1]
    found = [m for m in _mounts(compose["services"][service]) if m[1] == images]
    assert found, f"{service} does not mount the indexer's --images folder {images}"
    return found[0]


@pytest.mark.parametrize("service", ["indexer", "api"])
def test_without_photos_the_folder_is_an_empty_named_volume(compose, service):
    """No PHOTOS: an empty folder, so the indexer's demo indexes the emoji set."""
    source, _, read_only = _photos_mount(compose, service)
    assert source in (compose.get("volumes") or {}) and read_only
    assert source not in {m[0] for m in _mounts(compose["services"]["indexer"]) if not m[2]}, (
        "the photo volume must be nobody's writable volume (it stays empty)"
    )


@pytest.mark.parametrize("photos", ["/home/me/Pictures", "./photos", "~/Pictures"])
def test_photos_bind_mounts_the_same_folder_read_only_in_both_services(photos):
    """The indexer embeds the folder; the api serves its files, which the bundle names by their path."""
    compose = load("docker-compose.yml", {"PHOTOS": photos})
    indexer, api = _photos_mount(compose, "indexer"), _photos_mount(compose, "api")
    assert indexer == api == (photos, indexer[1], True)


def test_api_waits_for_the_indexer_and_reads_its_bundles_read_only(compose):
    api, indexer = compose["services"]["api"], compose["services"]["indexer"]
    assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    command = api["command"]
    assert command[0] == "serve"
    bundles = PurePosixPath(command[command.index("--bundles") + 1])
    indexer_volumes = {source for source, _, _ in _mounts(indexer)}
    shared = [(s, PurePosixPath(t), ro) for s, t, ro in _mounts(api) if s in indexer_volumes]
    assert shared, "the api does not mount the indexer's volume"
    assert all(ro for _, _, ro in shared), "the api must mount the bundles read-only"
    assert any(bundles.is_relative_to(target) for _, target, _ in shared), f"{bundles} is outside the mount"
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
    assert 5 <= duration_s(api["stop_grace_period"]) <= 120


def test_api_healthcheck_probes_readyz_with_python(compose):
    check = compose["services"]["api"]["healthcheck"]
    assert check["test"][0] == "CMD" and check["test"][1] == "python"
    assert "/readyz" in " ".join(check["test"])
    for key in ("interval", "timeout", "start_period"):
        duration_s(check[key])


@pytest.mark.slow
def test_api_healthcheck_passes_only_when_ready(compose, readyz_stub):
    argv = [sys.executable, *compose["services"]["api"]["healthcheck"]["test"][2:]]
    argv = [a.replace(":8000/", f":{readyz_stub.port}/") for a in argv]
    readyz_stub.status = 200
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    readyz_stub.status = 503
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode != 0


def test_gpu_override_reserves_an_nvidia_gpu(compose):
    gpu = load("docker-compose.gpu.yml")
    assert set(gpu["services"]) <= set(compose["services"]), "the override names unknown services"
    for name in ("indexer", "api"):
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        variant = gpu["services"][name]["build"]["args"]["TORCH_VARIANT"]
        torch_runs = " ".join(r.args for s in parse(REPO / "Dockerfile")[1] for r in s.all("RUN"))
        assert f"{variant})" in torch_runs, f"the Dockerfile has no TORCH_VARIANT={variant} branch"


def _docs_overrides() -> list[dict[str, Any]]:
    """The compose overrides docs/docker.md shows (YAML blocks with `services:`)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "docker.md").read_text(), re.S)
    return [data for b in blocks if isinstance(data := yaml.safe_load(b), dict) and "services" in data]


def test_the_documented_override_uses_the_photo_folder_and_a_mounted_model():
    (override,) = _docs_overrides()
    indexer = override["services"]["indexer"]
    command = indexer["command"]
    photos = _photos_mount(load("docker-compose.yml"), "indexer")[1]
    assert command[command.index("--images") + 1] == photos
    model = command[command.index("--model") + 1]
    assert any(m.target == model and m.read_only and m.is_bind for m in mounts(indexer))
    api = load("docker-compose.yml")["services"]["api"]["command"]
    served = api[api.index("--bundles") + 1]
    assert command[command.index("--bundles") + 1] == served, (
        "the override must index into the served bundles"
    )


def _container_commands() -> list[list[str]]:
    compose = load("docker-compose.yml")
    commands = [s["command"] for s in compose["services"].values() if "command" in s]
    commands += [s["command"] for o in _docs_overrides() for s in o["services"].values() if "command" in s]
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
