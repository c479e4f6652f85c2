"""Zero-shot classification, as CLIP papers report it: each class name put into prompt templates, the
prompts' text embeddings averaged into one classifier vector per class, and each image assigned the class
whose vector scores highest (Radford et al. 2021, section 3.1.4; open_clip's `build_zero_shot_classifier`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from indexer.data.sources import DataError

TOP_KS = (1, 5)


def _formats(templates: Sequence[Callable[[str], str]]) -> tuple[str, ...]:
    return tuple(t("{}") for t in templates)


# Named prompt sets: CLIP's 80 ImageNet prompts, the 7 its authors kept as the best subset, or the name alone.
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "simple": _formats(SIMPLE_IMAGENET_TEMPLATES),
    "openai": _formats(OPENAI_IMAGENET_TEMPLATES),
    "name": ("{}",),
}
DEFAULT_PROMPTS = "simple"


def prompt_templates(spec: str) -> tuple[str, ...]:
    """A named prompt set, or a file with one template per line, each with `{}` where the class goes."""
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--prompts {spec}: not one of {', '.join(PROMPT_SETS)} nor a file of templates")
    templates = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise DataError(
            f"--prompts {spec}: every line must be a template with {{}} (found {bad[:1] or 'none'})"
        )
    return templates


def read_classes(spec: str) -> tuple[str, ...]:
    """`--classes`: a file with one class name per line, or class names separated by commas."""
    path = Path(spec)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        names = [n.strip() for n in spec.split(",")]
    names = [n for n in names if n]
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"--classes {spec}: give at least 2 distinct class names (a file, or a,b,c)")
    return tuple(names)


def label_indices(
    labels: Sequence[Sequence[str]], classes: Sequence[str] | None, where: Sequence[str]
) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    """(classes, each image's label indices). Without `classes`, they are the distinct labels, sorted;
    with them, a label is a class name or an index into them (ImageNet-style files give numbers).

    Raises:
        DataError: a label that is not one of `classes`, naming the image (`where[i]`).
    """
    if classes is None:
        classes = tuple(sorted({lab for labs in labels for lab in labs}))
    index = {name: i for i, name in enumerate(classes)}
    out: list[tuple[int, ...]] = []
    for i, labs in enumerate(labels):
        ids = []
        for lab in labs:
            k = index.get(lab)
            if k is None and lab.isdigit() and int(lab) < len(classes):
                k = int(lab)
            if k is None:
                raise DataError(f"{where[i]}: label {lab!r} is not one of the {len(classes)} --classes")
            ids.append(k)
        out.append(tuple(ids))
    return tuple(classes), out


def class_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray], classes: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """(n_classes, dim) unit vectors: the mean of each class's unit prompt embeddings, renormalised."""
    prompts = [t.format(c) for c in classes for t in templates]
    emb = encode_texts(prompts).reshape(len(classes), len(templates), -1).mean(axis=1)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class ZeroShotMetrics:
    """Top-k accuracy over `n` labelled images and `classes` classes; an image with several labels is
    correct when any of them is in its top k."""

    n: int
    classes: int
    top1: float
    top5: float
    prompts: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "classes": self.classes,
            "top1": self.top1,
            "top5": self.top5,
            "prompts": self.prompts,
        }


def zero_shot_accuracy(
    image_emb: np.ndarray, class_emb: np.ndarray, labels: Sequence[Sequence[int]], prompts: str
) -> ZeroShotMetrics:
    """Accuracy of labelled images (rows of `image_emb` with labels; unlabelled ones are left out)."""
    rows = [i for i, labs in enumerate(labels) if labs]
    if not rows:
        raise DataError("no image has a label: zero-shot classification needs a label column")
    scores = image_emb[rows] @ class_emb.T  # (labelled images, classes)
    k = min(max(TOP_KS), scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = {
        kk: float(np.mean([bool(set(top[j, :kk]) & set(labels[i])) for j, i in enumerate(rows)]))
        for kk in TOP_KS
    }
    return ZeroShotMetrics(len(rows), class_emb.shape[0], hits[1], hits[5], prompts)
