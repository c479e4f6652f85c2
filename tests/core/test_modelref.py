"""Model references resolve into model dirs: tags through open_clip's real download code (the Hub call at its
boundary replaced by one serving a local file), checkpoint files, model dirs and `hf-hub:` repositories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from indexer.core.encoder import Encoder
from indexer.core.modeldir import CONFIG_NAME, WEIGHTS_NAME, ModelError, is_model_dir, read_model_cfg
from indexer.core.modelref import ModelReference, kind_of, load_reference, resolve_model_dir, save_reference

TEXTS = ["a red square", "a photo of a dog"]


class FakeHub:
    """Stands in for `huggingface_hub.hf_hub_download` as open_clip calls it: files from local repos."""

    def __init__(self, repos: dict[str, dict[str, Path]]) -> None:
        self.repos, self.calls = repos, []

    def __call__(self, repo_id: str, filename: str, revision=None, cache_dir=None, **kw) -> str:
        self.calls.append((repo_id, filename))
        path = self.repos.get(repo_id, {}).get(filename)
        if path is None:
            raise FileNotFoundError(f"404: {repo_id}/{filename}")
        return str(path)


@pytest.fixture
def original(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A `tiny-test` model with its own weights, and those weights as a checkpoint file."""
    torch.manual_seed(7)
    model = open_clip.create_model("tiny-test").eval()
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return model, ckpt


@pytest.fixture
def tagged(monkeypatch: pytest.MonkeyPatch, original) -> FakeHub:
    """`tiny-test` gets a pretrained tag `fake` hosted on the (fake) Hub, like open_clip's own tags."""
    cfg = open_clip.pretrained._pcfg(hf_hub="clipsearch-test/tiny/", mean=(0.5,) * 3, std=(0.5,) * 3)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-test", {"fake": cfg})
    hub = FakeHub({"clipsearch-test/tiny": {WEIGHTS_NAME: original[1]}})
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hub)
    return hub


def _text_emb(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        emb = model.encode_text(open_clip.get_tokenizer("tiny-test")(TEXTS), normalize=True)
    return emb.numpy()


def test_a_tag_resolves_through_open_clips_download_into_a_model_dir(tmp_path, original, tagged):
    out = save_reference(ModelReference("tiny-test", "fake"), tmp_path / "out")
    assert is_model_dir(out)
    assert tagged.calls == [("clipsearch-test/tiny", WEIGHTS_NAME)]
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["name"] == "tiny-test:fake"
    assert config["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]  # the tag's preprocessing, not the default
    encoder = Encoder.from_dir(out, "cpu")
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), _text_emb(original[0]), atol=1e-6)
    assert encoder.info.name == "tiny-test:fake"


def test_a_checkpoint_file_or_model_dir_gives_the_weights(tmp_path, original):
    model, ckpt = original
    pt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, pt)
    from_safetensors = save_reference(ModelReference("tiny-test", str(ckpt)), tmp_path / "a")
    from_pt = save_reference(ModelReference("tiny-test", str(pt)), tmp_path / "b")
    from_dir = save_reference(ModelReference("tiny-test", str(from_pt)), tmp_path / "c")
    for out in (from_safetensors, from_pt, from_dir):
        emb = Encoder.from_dir(out, "cpu").encode_texts(TEXTS)
        np.testing.assert_allclose(emb, _text_emb(model), atol=1e-6)


def test_an_hf_hub_repository_resolves_with_its_own_config(tmp_path, monkeypatch, original):
    model, ckpt = original
    repo = save_reference(ModelReference("tiny-test", str(ckpt)), tmp_path / "repo")
    hub = FakeHub({"org/tiny-hub": {CONFIG_NAME: repo / CONFIG_NAME, WEIGHTS_NAME: repo / WEIGHTS_NAME}})
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hub)
    out = save_reference(ModelReference("hf-hub:org/tiny-hub"), tmp_path / "out")
    assert read_model_cfg(out) == read_model_cfg(repo)
    assert json.loads((out / CONFIG_NAME).read_text())["name"] == "hf-hub:org/tiny-hub"
    np.testing.assert_allclose(Encoder.from_dir(out, "cpu").encode_texts(TEXTS), _text_emb(model), atol=1e-6)


def test_missing_hub_weights_are_an_error_not_a_random_model(tmp_path, monkeypatch, original):
    repo = save_reference(ModelReference("tiny-test", str(original[1])), tmp_path / "repo")
    hub = FakeHub({"org/no-weights": {CONFIG_NAME: repo / CONFIG_NAME}})
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hub)
    with pytest.raises(ModelError, match="hf-hub:org/no-weights: not in the cache"):
        save_reference(ModelReference("hf-hub:org/no-weights"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tag_that_cannot_be_downloaded_names_the_tag_and_the_cache(tmp_path, monkeypatch, tagged):
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", FakeHub({}))
    with pytest.raises(ModelError) as e:
        load_reference(ModelReference("tiny-test", "fake"), cache_dir=str(tmp_path / "hub-cache"))
    message = str(e.value)
    assert "'fake'" in message and "tiny-test" in message and str(tmp_path / "hub-cache") in message
    assert "\n" not in message


def test_an_unknown_tag_lists_the_known_ones(tagged):
    with pytest.raises(ModelError, match=r"not a pretrained tag of tiny-test \(its tags: fake\)"):
        load_reference(ModelReference("tiny-test", "nonesuch"))
    with pytest.raises(ModelError, match=r"is not a pretrained tag of ViT-B-32.*laion2b_s34b_b79k"):
        load_reference(ModelReference("ViT-B-32", "nonesuch"))


@pytest.mark.parametrize(
    ("model", "pretrained", "message"),
    [
        ("hf-hub:org/x", "openai", "brings its own weights"),
        ("{dir}", "openai", "a tag needs an open_clip architecture"),
        ("tiny-test", "missing/weights.pt", "does not exist"),
        ("no-such-arch", None, "unknown model 'no-such-arch'"),
    ],
)
def test_references_that_cannot_work_are_one_line_errors(tiny_model_dir, model, pretrained, message):
    ref = ModelReference(model.format(dir=tiny_model_dir), pretrained)
    with pytest.raises(ModelError, match=message):
        load_reference(ref)


def test_indexing_refuses_an_untrained_architecture(tmp_path):
    assert kind_of(ModelReference("tiny-test")) == "untrained"
    with pytest.raises(ModelError, match="needs --pretrained"):
        resolve_model_dir(ModelReference("tiny-test"), tmp_path)


def test_a_resolved_reference_is_kept_and_reused(tmp_path, tagged, tiny_model_dir):
    assert resolve_model_dir(ModelReference(str(tiny_model_dir)), tmp_path) == tiny_model_dir
    first = resolve_model_dir(ModelReference("tiny-test", "fake"), tmp_path / ".work")
    assert first.parent == tmp_path / ".work" / "models" and is_model_dir(first)
    again = resolve_model_dir(ModelReference("tiny-test", "fake"), tmp_path / ".work")
    assert again == first and len(tagged.calls) == 1, "the second run neither downloads nor converts"


def test_a_changed_checkpoint_file_resolves_anew(tmp_path, original):
    model, ckpt = original
    first = resolve_model_dir(ModelReference("tiny-test", str(ckpt)), tmp_path)
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    second = resolve_model_dir(ModelReference("tiny-test", str(ckpt)), tmp_path)
    assert second != first
