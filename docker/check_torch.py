"""Fail the image build when pip ended with another torch than TORCH_VARIANT asked for.

    python check_torch.py VARIANT INDEX_URL

With TORCH_VARIANT=cpu a torch built for CUDA means the CPU wheel index was not used (unreachable, or
TORCH_INDEX_URL points elsewhere): the image would silently hold the CUDA libraries, several gigabytes
the CPU image does not need.
"""

from __future__ import annotations

import sys


def check(variant: str, index: str, version: str, cuda: str | None) -> str | None:
    """Why the installed torch does not fit `variant`, or None when it does."""
    if variant == "cpu" and cuda is not None:
        return (
            f"TORCH_VARIANT=cpu, but torch {version} from {index} is built for CUDA {cuda} (gigabytes "
            "of CUDA libraries): reach the CPU wheel index (https://download.pytorch.org/whl/cpu) or pass "
            "TORCH_INDEX_URL of another index with CPU wheels, or build --build-arg TORCH_VARIANT=cuda"
        )
    if variant == "cuda" and cuda is None:
        return (
            f"TORCH_VARIANT=cuda, but torch {version} from {index} is a CPU-only build: pass TORCH_INDEX_URL "
            "of an index with CUDA wheels (e.g. https://download.pytorch.org/whl/cu128), "
            "or build the cpu variant"
        )
    return None


def main(argv: list[str]) -> int:
    variant, index = argv
    import torch

    problem = check(variant, index, torch.__version__, torch.version.cuda)
    if problem:
        sys.stderr.write(f"error: {problem}\n")
        return 1
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    sys.stdout.write(f"torch {torch.__version__} ({built})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
