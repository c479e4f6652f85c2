"""Run `open_clip_train.main` with this project's shipped model configs registered (it only knows its own).

Usage: python benchmarks/open_clip_train_shim.py CONFIG_DIR [open_clip_train arguments...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import open_clip
from open_clip_train.main import main

if __name__ == "__main__":
    open_clip.add_model_config(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
