"""The data of ``queue_latency.png`` (``plot.py`` draws it): the broker's queue-latency samples
(``broker.jsonl``, written by ``traci up``) on the axis of training time, counted from the
first training step (the reducer's first BATCH), so start-up (imports, data, registration,
alignment) takes no room on it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def latency_series(
    records: Sequence[Mapping[str, Any]], start: float | None = None
) -> dict[str, list[float]]:
    """broker.jsonl as plot columns: seconds since ``start`` (the first training step,
    ``first_step_time``; None: since the first sample), p50/p99/interval mean in
    milliseconds (NaN for an interval with no observations) and live experts. Samples taken
    before ``start`` (start-up) are left out."""
    rows = sorted((r for r in records if isinstance(r.get("time"), (int, float))),
                  key=lambda r: r["time"])  # fmt: skip
    out: dict[str, list[float]] = {"t": [], "p50_ms": [], "p99_ms": [], "mean_ms": [], "live": []}
    t0, prev = (rows[0]["time"] if rows else 0.0) if start is None else start, None
    for r in rows:
        mean = math.nan
        count, total = r.get("count"), r.get("sum")
        if isinstance(count, (int, float)) and isinstance(total, (int, float)):
            base = prev if prev is not None and count >= prev[0] else (0.0, 0.0)  # reset
            if count > base[0]:
                mean = (total - base[1]) / (count - base[0]) * 1e3
            prev = (count, total)
        if r["time"] < t0:
            continue  # start-up: before the first training step
        out["t"].append(r["time"] - t0)
        out["p50_ms"].append(_num(r.get("p50_seconds")) * 1e3)
        out["p99_ms"].append(_num(r.get("p99_seconds")) * 1e3)
        out["mean_ms"].append(mean)
        out["live"].append(_num(r.get("live_experts")))
    return out


def first_step_time(train: Sequence[Mapping[str, Any]]) -> float | None:
    """When the first training step began (Unix seconds), from the reducer's train records:
    each is stamped with its wall-clock ``time`` and ``wall_seconds``, the training time since
    the reducer's first step (summed over restarts), so ``time - wall_seconds`` is the first
    step's moment, or later for a resumed life: the earliest is the run's. None without such
    records (a run from before they carried ``time``)."""
    starts = [
        _num(r.get("time")) - _num(r.get("wall_seconds"))
        for r in train
        if math.isfinite(_num(r.get("time")) - _num(r.get("wall_seconds")))
    ]
    return min(starts) if starts else None


def _num(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else math.nan
