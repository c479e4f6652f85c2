"""Model references: a model dir, an open_clip architecture with pretrained weights (a tag, a checkpoint
file or a model dir), or an `hf-hub:` name, loaded through open_clip and resolved once into a model dir.

The command line resolves a reference at its edge (`resolve_model_dir`, `save_reference`); `train` loads
one directly (`load_reference`). Downloads are open_clip's own (`open_clip.pretrained.download_pretrained*`,
which call the Hugging Face Hub or a URL); a download that fails is one `ModelError` naming the tag and
the cache it looked in. docs/live.md, "Any open_clip model".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch

from indexer.core.architectures import model_config, resolve_model_name, start_weights
from indexer.core.modeldir import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelError,
    is_model_dir,
    model_dir_kwargs,
    require_model_dir,
    save_model_dir,
)
from indexer.core.tower_weights import load_image_tower

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
MODELS_DIR = "models"  # under BUNDLES/.work: references `clipsearch index` resolved, reused by later runs
HF_CONFIG_NAME = "open_clip_config.json"  # what an open_clip repository on the Hub holds
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")

Kind = Literal["dir", "hub", "tag", "file", "untrained"]


@dataclass(frozen=True)
class ModelReference:
    """`--model` and `--pretrained` as given on the command line."""

    model: str
    pretrained: str | None = None

    def label(self) -> str:
        """A short human name: `ViT-B-32:laion2b_s34b_b79k`, `hf-hub:org/name`, or the dir's path."""
        if self.pretrained is None:
            return self.model
        weights = Path(self.pretrained).name if Path(self.pretrained).exists() else self.pretrained
        return f"{Path(self.model).name if Path(self.model).is_dir() else self.model}:{weights}"


@dataclass
class LoadedModel:
    """An open_clip model built from a reference, with what saving and feeding it needs."""

    model: Any
    name: str  # the open_clip name it was built from (`ViT-B-32`, `local-dir:/abs/dir`, `hf-hub:...`)
    model_cfg: dict[str, Any]  # saved as `model_cfg` in open_clip_config.json
    preprocess: Any  # open_clip's eval transform
    tokenizer: Any
    label: str
    image_pretrained: bool = False  # the image tower starts from its config's pretrained weights


def _is_dir(value: str) -> bool:
    return Path(value).expanduser().is_dir()


def kind_of(ref: ModelReference) -> Kind:
    """Which of the reference forms this is; `ModelError` for combinations that cannot work."""
    if ref.model.startswith(HF_HUB_PREFIX):
        if ref.pretrained is not None:
            raise ModelError(f"--model {ref.model} brings its own weights; leave out --pretrained")
        return "hub"
    if ref.pretrained is None:
        return "dir" if _is_dir(ref.model) else "untrained"
    path = Path(ref.pretrained).expanduser()
    if path.is_dir():
        require_model_dir(path, "--pretrained")
        return "file"
    if path.is_file():
        return "file"
    if _is_dir(ref.model) or ref.model.startswith(LOCAL_DIR_PREFIX):
        raise ModelError(
            f"--pretrained {ref.pretrained}: not a file or model dir (a tag needs an open_clip architecture "
            "as --model, not a model dir)"
        )
    if any(sep in ref.pretrained for sep in ("/", os.sep)) or ref.pretrained.endswith(
        (".pt", ".bin", ".safetensors", ".pth", ".npz")
    ):
        raise ModelError(f"--pretrained {ref.pretrained} does not exist")
    return "tag"


def _tag_cfg(name: str, tag: str) -> dict[str, Any]:
    cfg: dict[str, Any] = open_clip.pretrained.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.pretrained.list_pretrained_tags_by_model(name)
        known = f"its tags: {', '.join(tags)}" if tags else "open_clip has no pretrained tags for it"
        raise ModelError(f"--pretrained {tag!r} is not a pretrained tag of {name} ({known})")
    return cfg


def tag_cache(cfg: dict[str, Any], cache_dir: str | None = None) -> str:
    """The directory open_clip's `download_pretrained` looks in (and downloads into) for a tag's cfg."""
    if cache_dir:
        return cache_dir
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    return os.path.expanduser("~/.cache/clip")


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def download_tag(name: str, tag: str, cache_dir: str | None = None) -> Path:
    """The local checkpoint file of `name`'s pretrained `tag`, downloaded by open_clip if not cached."""
    cfg = _tag_cfg(name, tag)
    where = tag_cache(cfg, cache_dir)
    try:
        path = open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:  # urllib, huggingface_hub and OS errors alike: the user reads one line
        raise ModelError(
            f"cannot get the pretrained weights {tag!r} of {name}: not in the cache {where} and not "
            f"downloadable ({_one_line(e)})"
        ) from None
    if not path or not Path(path).is_file():
        raise ModelError(f"cannot get the pretrained weights {tag!r} of {name}: nothing found in {where}")
    return Path(path)


def _hub_file(model_id: str, filename: str | None, cache_dir: str | None) -> Path:
    try:
        path = open_clip.pretrained.download_pretrained_from_hf(
            model_id, filename=filename, cache_dir=cache_dir
        )
    except Exception as e:
        where = tag_cache({"hf_hub": model_id}, cache_dir)
        what = filename or "its weights"
        raise ModelError(
            f"cannot get {what} of {HF_HUB_PREFIX}{model_id}: not in the cache {where} and not "
            f"downloadable ({_one_line(e)})"
        ) from None
    return Path(path)


def _build(name: str, device: str, **kwargs: Any) -> tuple[Any, Any]:
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, **kwargs)
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        raise ModelError(f"cannot build model {name!r}: {_one_line(e)}") from e
    return model, preprocess


def load_weights(model: torch.nn.Module, weights: Path, what: str) -> None:
    """Load a checkpoint (open_clip's formats, or a model dir's safetensors) strictly into `model`."""
    try:
        open_clip.load_checkpoint(model, str(weights), strict=True)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"--pretrained {what} does not fit this architecture ({first})") from e


def _dir_preprocess(model_dir: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((model_dir / CONFIG_NAME).read_text()).get("preprocess_cfg", {})
    return cfg


def _preprocess_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """`create_model_and_transforms` keywords for a tag's (or a model dir's) preprocessing."""
    return {f"image_{k}": cfg[k] for k in PREPROCESS_KEYS if cfg.get(k) is not None}


def _architecture(ref: ModelReference) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(open_clip name, its model_cfg, build keywords that make a model dir load where it now is)."""
    name = resolve_model_name(ref.model)
    if name.startswith(LOCAL_DIR_PREFIX):
        kw = model_dir_kwargs(Path(name[len(LOCAL_DIR_PREFIX) :]))
        cfg = dict(model_config(name))
        if "text_cfg" in kw:
            cfg["text_cfg"] = {k: v for k, v in kw["text_cfg"].items() if k != "hf_model_pretrained"}
        return name, cfg, kw
    return name, dict(model_config(name)), {}


def load_reference(
    ref: ModelReference, device: str = "cpu", cache_dir: str | None = None, **model_kwargs: Any
) -> LoadedModel:
    """Build the model a reference names, with its weights; every error a user can fix is a `ModelError`.

    `model_kwargs` go to open_clip (e.g. `init_logit_bias` for a SigLIP loss). An `untrained` reference
    (an architecture alone) is what training from scratch starts from: randomly initialised, except the
    towers its config names starting weights for (a shipped `small-pt`: ImageNet for the image tower,
    MiniLM for the text tower), with the preprocessing those weights expect.
    """
    kind = kind_of(ref)
    if kind == "hub":
        return _load_hub(ref, device, cache_dir, **model_kwargs)
    name, cfg, kw = _architecture(ref)
    start = start_weights(name) if not name.startswith(LOCAL_DIR_PREFIX) else None
    if start is not None:
        kw |= _preprocess_kwargs(dict(start.preprocess))  # a tag's or model dir's own preprocessing wins
    weights: Path | None = None
    if kind == "tag":
        assert ref.pretrained is not None
        tag_cfg = _tag_cfg(name, ref.pretrained)
        weights = download_tag(name, ref.pretrained, cache_dir)
        kw |= _preprocess_kwargs(tag_cfg)
        if tag_cfg.get("quick_gelu") and not cfg.get("quick_gelu"):
            # A tag trained with QuickGELU (OpenAI's) under a plain name: build what it was trained as.
            kw["force_quick_gelu"] = True
            cfg["quick_gelu"] = True
    elif kind == "file":
        assert ref.pretrained is not None
        path = Path(ref.pretrained).expanduser()
        weights = path / WEIGHTS_NAME if path.is_dir() else path
        if path.is_dir():
            kw |= _preprocess_kwargs(_dir_preprocess(path))
    if weights is not None:
        kw.setdefault("pretrained_text", False)  # the checkpoint holds the text tower too
    model, preprocess = _build(name, device, **kw, **model_kwargs)
    if weights is not None:
        load_weights(model, weights, str(ref.pretrained))
    elif start is not None and start.image_tower is not None:
        n = load_image_tower(model, start.image_tower, start.image_format)
        log.info("image tower of %s: %d tensors from %s", name, n, start.image_tower)
    image_pretrained = weights is None and start is not None and start.image_tower is not None
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(model, name, cfg, preprocess, tokenizer, ref.label(), image_pretrained)


def _load_hub(ref: ModelReference, device: str, cache_dir: str | None, **model_kwargs: Any) -> LoadedModel:
    model_id = ref.model[len(HF_HUB_PREFIX) :]
    config_path = _hub_file(model_id, HF_CONFIG_NAME, cache_dir)
    _hub_file(model_id, None, cache_dir)  # the weights: open_clip only warns when they are missing
    try:
        cfg: dict[str, Any] = json.loads(config_path.read_text())["model_cfg"]
    except (ValueError, KeyError) as e:
        raise ModelError(f"{ref.model}: {HF_CONFIG_NAME} is not an open_clip config ({_one_line(e)})") from e
    model, preprocess = _build(ref.model, device, cache_dir=cache_dir, **model_kwargs)
    tokenizer = open_clip.get_tokenizer(ref.model, cache_dir=cache_dir)
    return LoadedModel(model, ref.model, dict(cfg), preprocess, tokenizer, ref.label())


def save_reference(ref: ModelReference, out_dir: Path, device: str = "cpu") -> Path:
    """Write the model dir of `ref` at `out_dir` (new or empty), atomically: a temp sibling, then a rename."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelError(f"--out {out_dir} already exists and is not an empty directory")
    loaded = load_reference(ref, device)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_model_dir(loaded.model, loaded.model_cfg, tmp, loaded.tokenizer, name=loaded.label)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _slug(ref: ModelReference) -> str:
    """A dir name for a resolved reference: readable, plus a hash of what identifies its weights."""
    ident = [ref.model, ref.pretrained or ""]
    if ref.pretrained is not None and Path(ref.pretrained).expanduser().exists():
        path = Path(ref.pretrained).expanduser().resolve()
        target = path / WEIGHTS_NAME if path.is_dir() else path
        st = target.stat()
        ident = [ref.model, str(path), str(st.st_size), str(st.st_mtime_ns)]  # a changed file resolves anew
    digest = hashlib.sha256("\0".join(ident).encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", ref.label())[:60].strip("_.") or "model"
    return f"{readable}-{digest}"


def resolve_model_dir(ref: ModelReference, work_dir: Path, device: str = "cpu") -> Path:
    """The model dir to index with: `ref` itself when it is one, else its resolved copy under `work_dir`.

    A resolved reference is kept in `work_dir/models/` and reused by later runs (a checkpoint file that
    changed gets a new one). An architecture without weights is refused: a random model cannot search.
    """
    kind = kind_of(ref)
    if kind == "dir":
        require_model_dir(Path(ref.model).expanduser(), "--model")
        return Path(ref.model).expanduser()
    if kind == "untrained":
        resolve_model_name(ref.model)  # an unknown name says so first
        raise ModelError(
            f"--model {ref.model} needs --pretrained (a tag from open_clip.list_pretrained(), a checkpoint "
            "file or a model dir): an untrained model cannot search"
        )
    target = Path(work_dir) / MODELS_DIR / _slug(ref)
    if is_model_dir(target):
        return target
    if target.exists():
        shutil.rmtree(target)  # a half-written one from a run killed before the rename cannot exist; be sure
    log.info("resolving %s into %s", ref.label(), target)
    try:
        return save_reference(ref, target, device)
    except FileExistsError:  # another run resolved it meanwhile
        return target
