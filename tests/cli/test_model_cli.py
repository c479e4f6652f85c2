"""The README's published-model commands: `index --model ViT-B-32 --pretrained laion2b_s34b_b79k` and
`model save`, with open_clip's Hub download replaced at its boundary by one that serves a local
checkpoint (nothing can be downloaded here), and the offline error a user sees without that stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from indexer.core.bundle.read import open_bundle
from indexer.core.modeldir import CONFIG_NAME, WEIGHTS_NAME
from service.app import create_app
from service.settings import ServiceSettings
from tests.cli.test_index_cli import call
from tests.conftest import run_cli
from tests.index.helpers import make_folder

pytestmark = pytest.mark.slow

TAG = "laion2b_s34b_b79k"
REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"  # where open_clip's pretrained table says this tag lives


@pytest.fixture(scope="module")
def vit_b_32_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT-B-32 checkpoint in the layout the Hub serves it (random weights: the real ones cannot be had)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = tmp_path_factory.mktemp("hub") / WEIGHTS_NAME
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, vit_b_32_checkpoint: Path) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []

    def hf_hub_download(repo_id: str, filename: str, revision=None, cache_dir=None, **kw) -> str:
        calls.append((repo_id, filename))
        if (repo_id, filename) == (REPO, WEIGHTS_NAME):
            return str(vit_b_32_checkpoint)
        raise FileNotFoundError(f"404 {repo_id}/{filename}")

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    return calls


def test_index_and_serve_a_published_model_with_nothing_before_it(tmp_path, capsys, hub):
    photos, bundles = make_folder(tmp_path / "Pictures", 3), tmp_path / "bundles"
    args = ["index", "--model", "ViT-B-32", "--pretrained", TAG, "--images", str(photos)]
    code, _, err = call([*args, "--bundles", str(bundles), "--workers", "0"], capsys)
    assert code == 0, err
    assert hub == [(REPO, WEIGHTS_NAME)]
    bundle = open_bundle(bundles)
    assert bundle.manifest.model.name == f"ViT-B-32:{TAG}" and bundle.manifest.model.embed_dim == 512
    assert bundle.count("images") == 3
    assert json.loads((bundle.model_dir / CONFIG_NAME).read_text())["model_cfg"]["embed_dim"] == 512
    bundle.close()

    code, _, err = call([*args, "--bundles", str(bundles), "--workers", "0"], capsys)
    assert code == 0, err
    assert len(hub) == 1, "the resolved model dir is reused: no second download"

    with TestClient(create_app(ServiceSettings(bundles=bundles, reload_poll_s=0))) as client:
        info = client.get("/v1/info").json()
        assert info["model"]["name"] == f"ViT-B-32:{TAG}"
        hits = client.post("/v1/search/text", json={"query": "a picture number 1", "k": 3}).json()
        assert len(hits["results"]) == 3


def test_model_save_writes_an_open_clip_model_dir(tmp_path, capsys, hub):
    out = tmp_path / "models" / "vit-b-32"
    code, stdout, err = call(
        ["model", "save", "--model", "ViT-B-32", "--pretrained", TAG, "--out", str(out)], capsys
    )
    assert code == 0, err
    assert stdout.strip() == f"saved ViT-B-32:{TAG} to {out}"
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")  # any open_clip user loads it
    assert model.visual.image_size == (224, 224)
    code, _, err = call(
        ["model", "save", "--model", "ViT-B-32", "--pretrained", TAG, "--out", str(out)], capsys
    )
    assert code == 1 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_a_tag_that_cannot_be_downloaded_is_one_line_naming_the_tag_and_the_cache(tmp_path):
    cache = tmp_path / "hf-cache"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = run_cli(
        ["model", "save", "--model", "ViT-B-32", "--pretrained", TAG, "--out", str(tmp_path / "m")], env=env
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"error: cannot get the pretrained weights '{TAG}' of ViT-B-32: not in the cache {cache}"
    )
    assert not (tmp_path / "m").exists()

    photos, bundles = make_folder(tmp_path / "p", 1), tmp_path / "b"
    args = [
        "index",
        "--model",
        "ViT-B-32",
        "--pretrained",
        TAG,
        "--images",
        str(photos),
        "--bundles",
        str(bundles),
    ]
    proc = run_cli(args, env=env)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: cannot get")
    assert not (bundles / "CURRENT").exists()
