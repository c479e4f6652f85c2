"""The offline demo: emoji data → train → index → serve, each stage skipped when its output is valid.

Every stage runs the real `clipsearch` subcommand in a child process, exactly as a user would, and
records a small marker (`WORKDIR/.stages/NAME.json`) only after it succeeded, so an interrupted stage
is redone (or resumed) and a finished one costs nothing on the next run.

With `--images FOLDER` (the compose indexer's photo mount) the index stage embeds that folder instead
of the emoji set, with the demo's model, on every run: `clipsearch index` itself is incremental, so an
unchanged folder costs a scan. An empty folder means "no folder given": the emoji set is served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.core.errors import ClipsearchError

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"


class DemoError(ClipsearchError):
    """A demo stage that cannot run; the message says what to do."""


@dataclass(frozen=True)
class DemoConfig:
    """What `clipsearch demo` does and where."""

    workdir: Path = Path("demo-work")
    host: str = "127.0.0.1"
    port: int = 8000
    serve: bool = True
    time_budget_minutes: float = 3.0  # training budget: a few minutes on 2 CPU cores
    model: str = "small"
    device: str = "auto"
    font: Path | None = None
    limit: int | None = None  # use only the first N emoji (quick checks)
    images: Path | None = None  # index this folder (when it holds images) instead of the emoji set

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    @property
    def bundles_dir(self) -> Path:
        return self.workdir / "bundles"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


Runner = Callable[[Sequence[str]], int]
Say = Callable[[str], None]


def run_clipsearch(args: Sequence[str]) -> int:
    """Run `clipsearch ARGS` as a child process with this interpreter; its output goes to ours."""
    return subprocess.call([sys.executable, "-m", "clipsearch", *args])


# ------------------------------------------------------------------------------------------- markers


def _marker(cfg: DemoConfig, stage: str) -> Path:
    return cfg.workdir / ".stages" / f"{stage}.json"


def _read_marker(cfg: DemoConfig, stage: str) -> dict[str, Any] | None:
    try:
        data = json.loads(_marker(cfg, stage).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_marker(cfg: DemoConfig, stage: str, data: dict[str, Any]) -> None:
    path = _marker(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- validity checks


def data_state(cfg: DemoConfig) -> dict[str, Any] | None:
    """The data set's identity if it is complete: every CSV present and every listed image on disk."""
    import csv

    files = [cfg.data_dir / n for n in ("captions.csv", "train.csv", "val.csv")]
    if not all(f.is_file() for f in files):
        return None
    with open(files[0], newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not all((cfg.data_dir / r["filepath"]).is_file() for r in rows):
        return None
    return {"pairs": len(rows), "limit": cfg.limit}


def model_state(cfg: DemoConfig) -> dict[str, Any] | None:
    from indexer.core.modeldir import CONFIG_NAME, model_fingerprint

    if not (cfg.model_dir / CONFIG_NAME).is_file():
        return None
    try:
        return {"fingerprint": model_fingerprint(cfg.model_dir)}
    except ClipsearchError:
        return None


def index_state(cfg: DemoConfig) -> dict[str, Any] | None:
    """The current bundle if it opens (sizes checked, checksums skipped for speed) with this model."""
    from indexer.core.bundle.read import open_bundle

    model = model_state(cfg)
    try:
        bundle = open_bundle(cfg.bundles_dir, checksums=False)
    except ClipsearchError:
        return None
    try:
        if model is None or bundle.manifest.model.fingerprint != model["fingerprint"]:
            return None
        return {"bundle": bundle.version, "fingerprint": model["fingerprint"]}
    finally:
        bundle.close()


def _architecture(spec: str) -> dict[str, Any]:
    from indexer.core.architectures import model_config, resolve_model_name

    return model_config(resolve_model_name(spec))


def _is_done(cfg: DemoConfig, stage: str, state: dict[str, Any] | None, upstream: dict[str, Any]) -> bool:
    marker = _read_marker(cfg, stage)
    return (
        state is not None
        and marker is not None
        and marker.get("state") == state
        and (marker.get("upstream") == upstream)
    )


# ------------------------------------------------------------------------------------------- stages


def ensure_font(cfg: DemoConfig, say: Say, runner: Callable[[Sequence[str]], int] = subprocess.call) -> Path:
    """The emoji font; installs Debian's package when missing and allowed (root, or passwordless sudo)."""
    font = cfg.font or DEFAULT_FONT
    if font.is_file():
        return font
    if cfg.font is not None:
        raise DemoError(f"font {font} does not exist")
    if shutil.which("apt-get") is None:
        raise DemoError(
            f"{font} is missing: install Noto Color Emoji, or pass --font PATH to any colour emoji font"
        )
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None or runner(["sudo", "-n", "true"]) != 0:
            raise DemoError(
                f"{font} is missing: run `sudo apt-get install {FONT_PACKAGE}`, or pass --font PATH"
            )
        prefix = ["sudo", "-n"]
    say(f"installing {FONT_PACKAGE} with apt-get")
    env_cmd = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive"]
    if (
        runner([*env_cmd, "apt-get", "update", "-qq"]) != 0
        or runner([*env_cmd, "apt-get", "install", "-y", "-qq", FONT_PACKAGE]) != 0
        or not font.is_file()
    ):
        raise DemoError(f"could not install {FONT_PACKAGE}: install it yourself, or pass --font PATH")
    return font


def _stage(
    cfg: DemoConfig,
    name: str,
    make_args: Callable[[DemoConfig], list[str]],
    state_fn: Callable[[DemoConfig], dict[str, Any] | None],
    upstream: dict[str, Any],
    say: Say,
    run: Runner,
) -> dict[str, Any]:
    state = state_fn(cfg)
    if _is_done(cfg, name, state, upstream):
        say(f"[{name}] up to date, skipped")
        assert state is not None
        return state
    args = make_args(cfg)  # only now: building the arguments may clear a stale output
    say(f"[{name}] clipsearch {' '.join(args)}")
    if run(args) != 0:
        raise DemoError(f"the {name} stage failed (see the messages above); re-run to resume")
    state = state_fn(cfg)
    if state is None:
        raise DemoError(f"the {name} stage finished but its output is not valid")
    _write_marker(cfg, name, {"state": state, "upstream": upstream})
    return state


def _train_args(cfg: DemoConfig) -> list[str]:
    """Resume an interrupted run when it left a checkpoint; otherwise start afresh."""
    if (cfg.run_dir / "checkpoint").is_dir():
        return ["train", "--resume", str(cfg.run_dir)]
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)  # a run that died before its first checkpoint: nothing to keep
    args = ["train", "--train", str(cfg.data_dir / "train.csv"), "--val", str(cfg.data_dir / "val.csv")]
    args += ["--out", str(cfg.run_dir), "--model", cfg.model, "--device", cfg.device]
    return [*args, "--time-budget", f"{cfg.time_budget_minutes:g}"]


def own_images(cfg: DemoConfig, say: Say) -> Path | None:
    """The folder of the user's own images to index, or None for the emoji set."""
    if cfg.images is None:
        return None
    if not cfg.images.is_dir():
        raise DemoError(f"--images {cfg.images} is not a folder")
    from indexer.data.sources import iter_folder

    if next(iter_folder(cfg.images), None) is None:
        say(f"{cfg.images} holds no images: indexing the emoji set instead")
        return None
    return cfg.images


def _index_own_images(cfg: DemoConfig, images: Path, model: dict[str, Any], say: Say, run: Runner) -> str:
    """Index the user's folder with the demo's model, every run (incremental), without the emoji marker.

    The emoji index marker keeps naming the emoji bundle, so a later run without the folder re-indexes
    the emoji set rather than serving the photos as "up to date".
    """
    args = ["index", "--model", str(cfg.model_dir), "--images", str(images)]
    args += ["--bundles", str(cfg.bundles_dir), "--device", cfg.device]
    say(f"[index] clipsearch {' '.join(args)}")
    if run(args) != 0:
        raise DemoError("the index stage failed (see the messages above); re-run to resume")
    state = index_state(cfg)
    if state is None or state["fingerprint"] != model["fingerprint"]:
        raise DemoError("the index stage finished but its output is not valid")
    return str(state["bundle"])


def prepare(cfg: DemoConfig, say: Say, run: Runner = run_clipsearch) -> str:
    """Run the data, train and index stages as needed; returns the bundle version ready to serve."""
    from indexer.data.emoji import text_layout

    images = own_images(cfg, say)
    font = ensure_font(cfg, say)
    data_args = ["data", "emoji", "--out", str(cfg.data_dir), "--font", str(font)]
    data_args += ["--limit", str(cfg.limit)] if cfg.limit else []
    # Redone when Pillow's text layout changed: a set built without raqm lacks two thirds of the emoji.
    data = _stage(cfg, "data", lambda _: data_args, data_state, {"layout": text_layout()}, say, run)
    # A run is reused only for the same data and the same architecture (a new release may change what
    # `small` is).
    train_upstream = {**data, "architecture": _architecture(cfg.model)}
    if (
        not _is_done(cfg, "train", model_state(cfg), train_upstream)
        and _read_marker(cfg, "train") is not None
    ):
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # trained on other data or model: start over
        _marker(cfg, "train").unlink()
    model = _stage(cfg, "train", _train_args, model_state, train_upstream, say, run)
    if images is not None:
        return _index_own_images(cfg, images, model, say, run)
    index_args = ["index", "--model", str(cfg.model_dir), "--images", str(cfg.data_dir / "captions.csv")]
    index_args += ["--bundles", str(cfg.bundles_dir), "--device", cfg.device]
    index = _stage(cfg, "index", lambda _: index_args, index_state, model, say, run)
    return str(index["bundle"])


def serve_argv(cfg: DemoConfig) -> list[str]:
    """The command line that serves the demo bundle (exec'd, so Ctrl-C stops the server directly)."""
    return [
        sys.executable,
        "-m",
        "clipsearch",
        "serve",
        "--bundles",
        str(cfg.bundles_dir),
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--device",
        cfg.device,
    ]
