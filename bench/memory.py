"""Memory: peak RSS of every service over a long run, and whether it stays flat.

RSS is sampled from /proc every half second. "Flat" compares the RSS at the end with the RSS
a quarter into the run, once warm-up allocations (torch, the dataset, optimizer state) are
done; growth after that would be a leak.
"""

from __future__ import annotations

from typing import Any

from bench.cluster import run_cluster
from bench.reference import reference_config


def _rss_kib(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def run(*, quick: bool = False) -> dict[str, Any]:
    steps = 1500 if quick else 6000
    series: dict[str, list[tuple[int, int]]] = {}

    def sample(pids: dict[str, int]) -> None:
        for name, pid in pids.items():
            try:
                series.setdefault(name, []).append(_rss_kib(pid))
            except (OSError, KeyError):
                pass

    cfg = reference_config(batch_size=64, steps=steps)
    run_cluster(cfg, sample=sample)
    out: dict[str, Any] = {"steps": steps, "services": {}}
    for name, samples in sorted(series.items()):
        rss = [s[0] for s in samples]
        quarter = rss[len(rss) // 4]
        out["services"][name] = {
            "peak_rss_mib": round(max(s[1] for s in samples) / 1024, 1),
            "rss_at_quarter_mib": round(quarter / 1024, 1),
            "rss_at_end_mib": round(rss[-1] / 1024, 1),
            "growth_after_warmup_mib": round((rss[-1] - quarter) / 1024, 2),
            "samples": len(rss),
        }
    out["max_growth_after_warmup_mib"] = max(
        s["growth_after_warmup_mib"] for s in out["services"].values()
    )
    return out
