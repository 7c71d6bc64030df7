"""TRACI end to end: the reference model through `traci up` (six real processes, real broker).

Samples/s are taken from the reducer's own ``metrics.jsonl`` records (wall-clock ``time`` and
train ``step``) between the record at ``warmup`` steps and the last one, so process start-up,
registration and the final evaluation are not counted -- the same window the baselines time.
"""

from __future__ import annotations

import socket
from typing import Any

from bench.reference import reference_config


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive ports free on 127.0.0.1 now (expert i serves metrics on
    base + i)."""
    for _ in range(200):
        (base,) = free_ports(1)
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def traci_samples_per_sec(
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    window: int = 2,
    extra: dict | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """One `traci up` run of the reference model; returns samples/s and the run's summary."""
    from bench.cluster import run_cluster, train_rate

    cfg = reference_config(batch_size=batch_size, steps=steps, window=window)
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    records, summary = run_cluster(cfg, timeout=timeout)
    return {"samples_per_sec": train_rate(records, batch_size, warmup),
            "steps": summary["steps"], "test_accuracy": summary.get("test_accuracy")}  # fmt: skip


if __name__ == "__main__":
    for b in (64, 256, 1024):
        r = traci_samples_per_sec(batch_size=b, steps=300, warmup=50)
        print(f"batch {b:5d}: {r['samples_per_sec']:9.0f} samples/s")
