"""Where a run stands: enough to continue it exactly where it stopped (saved in every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from indexer.eval.metrics import RetrievalMetrics


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    samples: int = 0
    elapsed_s: float = 0.0
    best_score: float = -1.0  # `RetrievalMetrics.score()` of the best validation so far
    best_step: int = -1
    finished: bool = False
    last_eval_step: int = -1  # the step of the last validation (-1: none yet)
    best_val: RetrievalMetrics | None = None  # the metrics of the best validation

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["best_val"] = self.best_val.as_dict() if self.best_val is not None else None
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Progress:
        d = dict(d)
        legacy = d.pop("extra", None) or {}  # checkpoints before 0.2 kept the last two in `extra`
        d.setdefault("last_eval_step", legacy.get("last_eval_step", -1))
        best = d.get("best_val", legacy.get("best_val"))
        d["best_val"] = RetrievalMetrics.from_dict(best) if best else None
        return cls(**d)
