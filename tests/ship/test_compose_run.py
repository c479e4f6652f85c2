"""`make docker-test` runs rarely: its podman translation of docker-compose.yml is checked here, always."""

from __future__ import annotations

import json

import pytest

from tests.ship.compose_run import PROJECT, PodmanFollowingCompose
from tests.ship.composefile import load


@pytest.fixture
def podman() -> PodmanFollowingCompose:
    return PodmanFollowingCompose({"CONTAINER_SH": __file__, "PORT": "18123", "CLIPSEARCH_TAG": "t"})


def _flags(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_indexer_runs_first_and_to_completion(podman):
    services = load("docker-compose.yml")["services"]
    order = podman._order(services)
    assert order.index("indexer") < order.index("api")


def test_services_become_the_podman_runs_compose_would_do(podman):
    compose = load("docker-compose.yml", podman.env)
    indexer = podman._run_args("indexer", compose["services"]["indexer"], one_off=False)
    assert f"{PROJECT}_clipsearch-data:/data" in _flags(indexer, "-v")
    assert f"{PROJECT}_clipsearch-no-photos:/photos:ro" in _flags(indexer, "-v")
    assert "--no-healthcheck" in indexer and "--init" in indexer and "--restart" not in indexer
    image = compose["services"]["indexer"]["image"]
    assert image == "clipsearch:t"
    assert indexer[indexer.index(image) + 1 :] == compose["services"]["indexer"]["command"]

    api = podman._run_args("api", compose["services"]["api"], one_off=False)
    assert f"{PROJECT}_clipsearch-data:/data:ro" in _flags(api, "-v")
    assert _flags(api, "-p") == ["18123:8000"] and _flags(api, "--restart") == ["unless-stopped"]
    assert _flags(api, "--stop-timeout") == ["30"]
    check = compose["services"]["api"]["healthcheck"]
    assert json.loads(_flags(api, "--health-cmd")[0]) == check["test"][1:]
    assert _flags(api, "--health-interval") == [check["interval"]]
    assert _flags(api, "--health-start-period") == [check["start_period"]]


def test_photos_are_bind_mounted_and_a_one_off_run_publishes_nothing(podman, tmp_path):
    env = {**podman.env, "PHOTOS": str(tmp_path)}
    compose = load("docker-compose.yml", env)
    for name in ("indexer", "api"):
        assert f"{tmp_path}:/photos:ro" in _flags(
            podman._run_args(name, compose["services"][name], False), "-v"
        )
    one_off = podman._run_args("indexer", compose["services"]["indexer"], one_off=True)
    assert _flags(one_off, "--name") == [f"{PROJECT}-indexer-run"] and "-p" not in one_off


@pytest.mark.parametrize("no_cache", [False, True])
def test_the_build_uses_the_compose_build_args_once_per_image(podman, monkeypatch, no_cache):
    import tests.ship.compose_run as compose_run

    calls: list[list[str]] = []
    monkeypatch.setattr(compose_run, "run", lambda argv, env, timeout, prefix="": calls.append(argv))
    podman.env["TORCH_VARIANT"] = "cuda"
    podman.build(no_cache=no_cache)
    (argv,) = calls  # both services name the same image: one build
    assert argv[argv.index("build") + 1] == "clipsearch:t" and "--build-arg=TORCH_VARIANT=cuda" in argv
    assert ("--no-cache" in argv) == no_cache
