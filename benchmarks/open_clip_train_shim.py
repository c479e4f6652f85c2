"""Run `open_clip_train.main` with this project's shipped model configs registered (it only knows its own).

`register_shipped_configs` registers them as clipsearch itself does, with a Hugging Face text tower shipped
in a Python package (`package:...` in the config) resolved to its path on this installation.

Usage: python benchmarks/open_clip_train_shim.py [open_clip_train arguments...]
"""

from __future__ import annotations

import sys

from open_clip_train.main import main

from indexer.core.architectures import register_shipped_configs

if __name__ == "__main__":
    register_shipped_configs()
    sys.exit(main(sys.argv[1:]))
