"""Static checks of docker-compose.replicas.yml: N api replicas behind Caddy over the read-only volume,
publishing one port (the proxy's), with memory-mapped indexes."""

from __future__ import annotations

from typing import Any

import yaml

from service.settings import ServiceSettings
from tests.ship.composefile import REPO, interpolate, load


class _Reset:
    """Compose's `!reset` tag: the value of the file it overrides is dropped."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!reset", lambda loader, node: _Reset())


def _override(env: dict[str, str] | None = None) -> dict[str, Any]:
    text = interpolate((REPO / "docker-compose.replicas.yml").read_text(), env or {})
    return yaml.load(text, Loader=_Loader)  # a SafeLoader plus one tag


def test_the_replicas_publish_no_port_and_the_proxy_publishes_the_api_port():
    base = load("docker-compose.yml")
    over = _override()
    api = over["services"]["api"]
    assert isinstance(api["ports"], _Reset)  # N replicas cannot bind one host port
    assert api["deploy"]["replicas"] == 2
    assert _override({"API_REPLICAS": "4"})["services"]["api"]["deploy"]["replicas"] == 4
    proxy = over["services"]["proxy"]
    assert proxy["ports"] == base["services"]["api"]["ports"] == ["8000:8000"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"  # the api's /readyz healthcheck
    assert "healthcheck" in base["services"]["api"]


def test_the_replicas_map_the_indexes_and_the_setting_exists():
    env = _override()["services"]["api"]["environment"]
    assert env["CLIPSEARCH_MMAP_INDEXES"] == "true"
    assert "mmap_indexes" in ServiceSettings.model_fields
    assert {k.removeprefix("CLIPSEARCH_").lower() for k in env} <= set(ServiceSettings.model_fields)


def test_the_proxy_balances_over_every_replica_of_the_api_service():
    proxy = _override()["services"]["proxy"]
    source, target, *mode = proxy["volumes"][0].split(":")
    assert (REPO / source).is_file() and target == "/etc/caddy/Caddyfile" and mode == ["ro"]
    caddyfile = (REPO / source).read_text()
    assert "dynamic a" in caddyfile and "name api" in caddyfile and "port 8000" in caddyfile
    assert "lb_retries" in caddyfile
