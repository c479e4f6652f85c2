"""`metrics.jsonl` (one JSON object per logged step or evaluation) and its plot, `curves.png`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON line per event and flushes it, so a killed run keeps everything logged so far."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out: Path) -> Path:
    """Loss, learning rate, temperature (logit scale) and validation R@10 against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must come before pyplot
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        (axes[0, 0], train, "loss", "training loss"),
        (axes[0, 1], train, "lr", "learning rate"),
        (axes[1, 0], train, "logit_scale", "logit scale (1 / temperature)"),
    ]
    for ax, data, key, title in panels:
        ax.plot([r["step"] for r in data], [r[key] for r in data])
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes[1, 1]
    for key, label in (("t2i_R@10", "text→image R@10"), ("i2t_R@10", "image→text R@10")):
        ax.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=label)
    ax.set_title("validation recall")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out)
    return out
