"""Shared by the benchmark scripts: median wall time of a call, and writing the JSON report."""

from __future__ import annotations

import json
import time
from typing import Any, Callable


def median_seconds(fn: Callable[[], Any], sync: Callable[[Any], None], iters: int, warmup: int) -> float:
    """Median wall time (s) of ``sync(fn())`` over ``iters`` calls after ``warmup`` untimed ones.

    ``sync`` blocks until the result is computed (``jax.block_until_ready``, or a CUDA synchronize).
    """
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def write_report(report: dict, path: str | None) -> None:
    """Write ``report`` as indented JSON to ``path`` (nothing when None) and say so."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
