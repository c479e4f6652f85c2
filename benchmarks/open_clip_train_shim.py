"""Run `open_clip_train.main` with this project's model configs registered (it only knows its own).

`resolve_model_name` registers the shipped configs as clipsearch itself does, `package:` references
(the MiniLM tower, the ImageNet weights) resolved to their paths on this installation; a JSON config path
given as `--model` is registered the same way and passed on under its name, so both tools train the very
same config file.

Usage: python benchmarks/open_clip_train_shim.py [open_clip_train arguments...]
"""

from __future__ import annotations

import sys

from open_clip_train.main import main

from indexer.core.architectures import register_shipped_configs, resolve_model_name


def with_registered_model(argv: list[str]) -> list[str]:
    """`argv` with a `--model PATH.json` replaced by the name it is registered under."""
    register_shipped_configs()
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--model":
            out[i + 1] = resolve_model_name(out[i + 1])
    return out


if __name__ == "__main__":
    sys.exit(main(with_registered_model(sys.argv[1:])))
