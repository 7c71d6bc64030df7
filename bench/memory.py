"""Memory: peak RSS of every service over a long run, and whether it stays flat.

RSS is sampled from /proc every half second, each sample tagged with the reducer's last logged
train step (its metrics.jsonl). "Flat" is judged over training only: the RSS at the last
sample of training against the RSS a quarter into it (once warm-up allocations -- torch, the
dataset, optimizer state -- are done), and the least-squares slope between the two in MiB per
1000 steps; growth there would be a leak. The final evaluation (every test row, then again
with each expert masked) runs after the last train step and holds its outputs until the
summary is written: its extra RSS is reported on its own, as ``final_eval_extra_mib``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.cluster import run_cluster
from bench.reference import reference_config
from traci_ml.core.rundir import RunDir


def _rss_kib(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def last_train_step(run_dir: Path) -> int:
    """The step of the last ``train`` record in ``run_dir/metrics.jsonl`` (0: none yet)."""
    try:
        with RunDir(run_dir).metrics.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(fh.tell() - 8192, 0))
            lines = fh.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the first, cut line, or one being written
        if record.get("kind") == "train":
            return int(record["step"])
    return 0


def slope_mib_per_1000(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of (step, RSS KiB) points, in MiB per 1000 steps."""
    if len(points) < 2 or len({s for s, _ in points}) < 2:
        return 0.0
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(r for _, r in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    sxy = sum((s - mx) * (r - my) for s, r in points)
    return sxy / sxx * 1000 / 1024


def summarise(samples: list[tuple[int, int, int]], steps: int) -> dict[str, Any]:
    """One service's (train step, RSS KiB, peak KiB) samples -> its figures."""
    rss = [r for _, r, _ in samples]
    training = [(s, r) for s, r, _ in samples if steps // 4 <= s < steps]
    after = [r for s, r, _ in samples if s >= steps]
    out: dict[str, Any] = {
        "peak_rss_mib": round(max(p for _, _, p in samples) / 1024, 1),
        "rss_at_end_mib": round(rss[-1] / 1024, 1),
        "samples": len(rss),
    }
    if len(training) >= 2:
        quarter, last = training[0][1], training[-1][1]
        out.update(
            rss_at_quarter_mib=round(quarter / 1024, 1),
            rss_at_end_of_training_mib=round(last / 1024, 1),
            growth_in_training_mib=round((last - quarter) / 1024, 2),
            slope_mib_per_1000_steps=round(slope_mib_per_1000(training), 3),
            final_eval_extra_mib=round((max(after, default=last) - last) / 1024, 1),
        )
    return out


def run(*, quick: bool = False) -> dict[str, Any]:
    steps = 1500 if quick else 6000
    series: dict[str, list[tuple[int, int, int]]] = {}

    def sample(pids: dict[str, int], run_dir: Path) -> None:
        step = last_train_step(run_dir)
        for name, pid in pids.items():
            try:
                series.setdefault(name, []).append((step, *_rss_kib(pid)))
            except (OSError, KeyError):
                pass

    cfg = reference_config(batch_size=64, steps=steps)
    run_cluster(cfg, sample=sample)
    out: dict[str, Any] = {"steps": steps, "services": {}}
    for name, samples in sorted(series.items()):
        out["services"][name] = summarise(samples, steps)
    growth = [s.get("growth_in_training_mib", 0.0) for s in out["services"].values()]
    out["max_growth_in_training_mib"] = max(growth, default=0.0)
    return out
