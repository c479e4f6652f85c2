"""How many processes decode or render in parallel: one policy for every stage."""

from __future__ import annotations

import os

MAX_WORKERS = 8


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(main_busy: bool = True) -> int:
    """One worker per usable CPU, leaving one to the main process when it works meanwhile (indexing runs
    the model while workers decode the next batches); at least 1, at most `MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, usable_cpus() - (1 if main_busy else 0)))
