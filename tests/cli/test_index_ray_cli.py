"""`clipsearch index --ray [ADDRESS]` on the command line: the implied address, the options reaching the
run, and one-line errors (no Ray installed, --watch with --ray)."""

from __future__ import annotations

import sys

import pytest

from clipsearch.commands.app import fill_optional_values
from indexer.index.ray_embed import LOCAL, RayConfig
from indexer.index.runner import ReindexResult
from tests.cli.test_index_cli import call


def test_ray_alone_means_a_local_instance():
    assert fill_optional_values(["index", "--ray"]) == ["index", "--ray", LOCAL]
    assert fill_optional_values(["index", "--ray", "--full"]) == ["index", "--ray", LOCAL, "--full"]
    assert fill_optional_values(["index", "--ray", "auto"]) == ["index", "--ray", "auto"]
    assert fill_optional_values(["index", "--full"]) == ["index", "--full"]


def _args(model, tmp_path) -> list[str]:
    return ["index", "--model", str(model), "--images", str(tmp_path), "--bundles", str(tmp_path / "b")]


def test_the_ray_options_reach_the_run(tiny_model_dir, tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_reindex(cfg):
        seen["ray"] = cfg.ray
        return ReindexResult("v1", 1, 0, 0, 0, 0, 1, 1, 0.1)

    monkeypatch.setattr("indexer.index.runner.reindex", fake_reindex)
    code, _, err = call([*_args(tiny_model_dir, tmp_path), "--ray", "--ray-actors", "3"], capsys)
    assert code == 0, err
    assert seen["ray"] == RayConfig(address=LOCAL, actors=3)
    code, _, err = call([*_args(tiny_model_dir, tmp_path), "--ray", "ray://head:10001"], capsys)
    assert code == 0, err
    assert seen["ray"].address == "ray://head:10001"
    code, _, err = call(_args(tiny_model_dir, tmp_path), capsys)
    assert code == 0 and seen["ray"] is None


def test_ray_without_ray_installed_is_one_line_saying_what_to_install(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    (tmp_path / "a.png").write_bytes(b"")
    code, _, err = call([*_args(tiny_model_dir, tmp_path), "--ray"], capsys)
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "pip install 'clipsearch[ray]'" in err and err.startswith("error:")
    assert not (tmp_path / "b" / "CURRENT").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ray", "--watch"], "--watch"),
        (["--ray", "--ray-actor-cpus", "0"], "--ray-actor-cpus"),
        (["--ray", "--ray-actors", "0"], "--ray-actors"),
    ],
)
def test_bad_ray_options_are_one_line(tiny_model_dir, tmp_path, capsys, extra, message):
    code, _, err = call([*_args(tiny_model_dir, tmp_path), *extra], capsys)
    assert code != 0 and message in err and err.strip().count("\n") == 0
