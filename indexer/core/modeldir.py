"""The model directory: open_clip's saved-model layout (`open_clip_config.json` + safetensors, and a
Hugging Face text tower's config and tokenizer), written atomically and loadable from wherever it is.

`open_clip.create_model_and_transforms("local-dir:DIR")` loads it; so do `clipsearch eval`, `index`
and `serve`. No pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import save_file

from indexer.core.errors import ClipsearchError
from indexer.core.hashing import file_sha256

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
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


class ModelError(ClipsearchError, ValueError):
    """A model spec or model directory that cannot be used; the message says why."""


def is_model_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file() and (Path(path) / WEIGHTS_NAME).is_file()


def require_model_dir(path: Path, what: str = "") -> None:
    """Raise `ModelError` unless `path` holds a config and weights (`what` prefixes the message)."""
    if not is_model_dir(path):
        prefix = f"{what} " if what else ""
        raise ModelError(f"{prefix}{path} is not a model dir: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")


def save_model_dir(
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    out_dir: Path,
    tokenizer: Any = None,
    name: str | None = None,
) -> Path:
    """Write the model dir (config JSON + safetensors), atomically per file.

    `tokenizer`: the model's open_clip tokenizer when the caller has it loaded (a Hugging Face tower's is
    saved from it instead of being loaded again from the config's path). `name` is recorded as the
    config's `name` (what `/v1/info` shows); open_clip ignores the key.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = _save_hf_side_files(model, model_cfg, out_dir, tokenizer)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_weights = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp_weights))
    tmp_cfg = out_dir / f".{CONFIG_NAME}.tmp"
    save_config_for_hf(model, tmp_cfg, model_cfg)
    if name is not None:
        tmp_cfg.write_text(json.dumps({"name": name, **json.loads(tmp_cfg.read_text())}, indent=2))
    for tmp, final in ((tmp_weights, WEIGHTS_NAME), (tmp_cfg, CONFIG_NAME)):
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / final)
    return out_dir


def model_files(model_dir: Path) -> list[str]:
    """The files that make up a model dir: config and weights, and a Hugging Face tower's side files."""
    return [CONFIG_NAME, WEIGHTS_NAME] + [n for n in HF_SIDE_FILES if (Path(model_dir) / n).is_file()]


def read_model_cfg(model_dir: Path) -> dict[str, Any]:
    """The architecture config (`model_cfg`) a model dir was saved with."""
    cfg: dict[str, Any] = json.loads((Path(model_dir) / CONFIG_NAME).read_text())["model_cfg"]
    return cfg


def model_dir_kwargs(model_dir: Path) -> dict[str, Any]:
    """Keyword overrides for `open_clip.create_model*("local-dir:DIR", ...)` that make a model dir with a
    Hugging Face text tower load wherever the dir now is.

    Its `open_clip_config.json` names the tower by the path it had when saved; a dir that was moved,
    copied into a bundle, or mounted into a container carries the tower's config next to the weights, so
    the tower is built from there instead (its weights come from the safetensors file either way).
    """
    model_dir = Path(model_dir)
    text_cfg = read_model_cfg(model_dir).get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return {}
    if (model_dir / "config.json").is_file():
        return {"text_cfg": {**hf_names_at(text_cfg, model_dir), "hf_model_pretrained": False}}
    if Path(text_cfg["hf_model_name"]).is_dir():
        return {}
    raise ModelError(
        f"{model_dir}: its Hugging Face text tower {text_cfg['hf_model_name']!r} is neither in the model "
        "dir (config.json) nor at that path"
    )


def hf_names_at(text_cfg: dict[str, Any], model_dir: Path) -> dict[str, Any]:
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
    hf_tokenizer: Any = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps the HF one
    if "hf_model_name" not in text_cfg and text_cfg.get("hf_tokenizer_name") and hf_tokenizer is not None:
        # An open_clip text tower with a Hugging Face tokenizer (SigLIP): open_clip reads a model dir's
        # tokenizer from the dir itself, so it goes there and the dir loads offline.
        hf_tokenizer.save_pretrained(str(out_dir))
        return {**model_cfg, "text_cfg": {**text_cfg, "hf_tokenizer_name": str(out_dir.resolve())}}
    if "hf_model_name" not in text_cfg or text is None or not hasattr(text, "config"):
        return model_cfg
    from transformers import AutoTokenizer

    text.config.save_pretrained(str(out_dir))
    if hf_tokenizer is not None and hasattr(hf_tokenizer, "save_pretrained"):
        hf_tokenizer.save_pretrained(str(out_dir))
    else:
        source = text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"]
        if Path(source).resolve() != out_dir.resolve():
            AutoTokenizer.from_pretrained(source).save_pretrained(str(out_dir))
    return {**model_cfg, "text_cfg": hf_names_at(text_cfg, out_dir)}


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of the weights file: two model dirs with equal fingerprints embed identically."""
    weights = Path(model_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(f"{model_dir} has no {WEIGHTS_NAME}")
    return file_sha256(weights)
